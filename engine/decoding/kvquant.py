"""The int8 KV cache: its per-channel scales, and moving cached keys between int8 and float.

A generator exported with `ragrt export --kv-cache int8` decodes on an int8 cache (its step
graph; schema-6 bundles: its only graph): GroupQueryAttention stores each new key and value as
round(x / scale), per layer, kv head and channel, and reads the cache back as int8 x scale, with
the scales the export fitted (`GeneratorSpec.kv_scales`: one (kv_heads, head_dim) row per past,
k0, v0, k1, v1, ...). A batched decode step on the CPU is bound by reading the cache; int8 reads a
quarter of float32's bytes. Key scales are equal across each rotary pair, so a key turned by
R(delta) (passage KV) stays within range.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ragrt.bundle.manifest import GeneratorSpec
from ragrt.errors import BundleError

KV_INT8 = np.dtype(np.int8)


def load_kv_scales(root: Path, spec: GeneratorSpec) -> np.ndarray | None:
    """The scales of an int8 cache, (2 x layers, kv_heads, head_dim) float32; None without one."""
    if not spec.kv_scales:
        return None
    path = Path(root) / spec.kv_scales
    try:
        scales = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise BundleError(f"{path}: cannot read the int8 cache's scales ({e})") from None
    if scales.shape != (2 * spec.num_layers, spec.num_kv_heads, spec.head_dim) or scales.dtype != np.float32:
        raise BundleError(f"{path}: scales of shape {scales.shape} and type {scales.dtype}, not float32 "
                          f"{(2 * spec.num_layers, spec.num_kv_heads, spec.head_dim)}; the bundle is corrupted")
    return scales


def quantize(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(kv_heads, n, head_dim) floats as the graph stores them, with one past's scale (kv_heads, head_dim);
    or several pasts' at once, (pasts, kv_heads, n, head_dim) with (pasts, kv_heads, head_dim)."""
    y = x / scale[..., None, :]
    np.rint(y, out=y)                   # in place: a joining row's whole cache passes through here
    np.clip(y, -128, 127, out=y)
    return y.astype(KV_INT8)


def dequantize(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * scale[..., None, :]
