"""Documents -> passages: reading JSONL or a folder of text, chunking, and `ragrt index add/remove`."""
