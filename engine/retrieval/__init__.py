"""Question -> passages: the ONNX encoder, the memory-mapped USearch index and passage store, and the
retriever that follows corpus updates while the engine runs."""
