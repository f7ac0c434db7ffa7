"""Quantizing the exported graphs: int8/int4 MatMulNBits, AWQ scaling, GPTQ rounding, w8a8 rows, and
merged sibling MatMuls."""
