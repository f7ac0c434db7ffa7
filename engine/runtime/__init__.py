"""The operating system and onnxruntime under the engine: sessions, memory mappings, huge pages and madvise."""
