"""The operating system and onnxruntime under the engine: sessions, huge pages and madvise."""
