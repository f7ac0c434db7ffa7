"""Passages + question -> answer tokens: the prompt builder, the KV-cached decoder over one ONNX graph
(masked or packed cache), prompt-lookup drafts, and the RAG modes (concat, RAG-Token, RAG-Sequence)."""
