"""PyTorch checkpoints -> ONNX graphs: optimum's export and onnxruntime-genai's fused builder."""
