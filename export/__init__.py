"""ragrt's build pipeline: corpus ingestion, fine-tuning, ONNX export and bundle packing (torch-side; corpus and pydocs need no torch)."""
