"""Offline datasets from Debian's `python3.11-doc`: the Python docs corpus and the FAQ Q/A splits."""
