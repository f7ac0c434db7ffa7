"""The arithmetic of `ragrt finetune` and `ragrt data synth`: bf16 autocast where the CPU has bf16
units (AVX512-BF16 or AMX), where it halves a training step; fp32 where bf16 would be emulated,
and slower. Weights and optimizer moments stay fp32 either way: autocast casts each matmul's inputs."""
from __future__ import annotations

PRECISIONS = ("auto", "bf16", "fp32")


def native_bf16() -> bool:
    import torch
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def resolve(precision: str) -> str:
    """`auto` made concrete for this machine."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    return ("bf16" if native_bf16() else "fp32") if precision == "auto" else precision


def autocast(precision: str):
    """A context in which torch computes at `precision` (resolved)."""
    import torch
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=resolve(precision) == "bf16")
