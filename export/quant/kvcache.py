"""`ragrt export --kv-cache int8`: the generator keeps its KV cache in int8.

onnxruntime's GroupQueryAttention quantizes the cache itself when told to (k_quant_type and
v_quant_type PER_CHANNEL, kv_cache_bit_width 8, k_scale and v_scale inputs): it stores
round(x / scale) and reads int8 x scale back, so only the graph's cache inputs and outputs
change type. The scales are fitted here, per layer, kv head and channel, from what the float
graph writes on calibration prompts: the largest |value| times VALUE_MARGIN, and for keys the
largest norm of each rotary pair (channels i and i + rotary_dim / 2), which a key keeps at every
position, so keys turned by R(delta) for passage KV stay in range. Scales land in the graph and
in kv_scales.npy beside it (the runtime turns int8 keys with them).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ragrt.bundle.manifest import GeneratorSpec, KVCacheParity

VALUE_MARGIN = 1.25       # values seen on a user's questions may exceed the calibration's; keys need none
QUANT_ATTRIBUTES = {"k_quant_type": "PER_CHANNEL", "v_quant_type": "PER_CHANNEL", "kv_cache_bit_width": 8}
SCALE_INPUTS = 12         # GroupQueryAttention's k_scale and v_scale are its inputs 12 and 13


def fit_kv_scales(decoder, prompts: list[list[int]]) -> np.ndarray:
    """(2 x layers, kv_heads, head_dim) float32 from prefilling `prompts` on a float-cache packed decoder."""
    spec: GeneratorSpec = decoder.spec
    peak = np.zeros((2 * spec.num_layers, spec.num_kv_heads, spec.head_dim), np.float32)
    half = (spec.rotary_dim or spec.head_dim) // 2
    for ids in prompts:
        _, state = decoder.prefill([ids])
        for i, a in enumerate(state.buffers.arrays):
            x = np.abs(a[0, :, :len(ids)].astype(np.float32))               # (kv_heads, n, head_dim)
            if i % 2 == 0:                                                     # keys: rotary pair norms
                pair = np.sqrt(x[..., :half] ** 2 + x[..., half:2 * half] ** 2)
                x = x.copy()
                x[..., :half] = x[..., half:2 * half] = pair
            peak[i] = np.maximum(peak[i], x.max(axis=1))
    peak[1::2] *= VALUE_MARGIN
    return np.maximum(peak / 127, np.finfo(np.float32).tiny).astype(np.float32)


def quantize_kv_graph(src: Path, dst: Path, scales: np.ndarray) -> int:
    """Writes `src` with every GroupQueryAttention keeping an int8 cache; returns how many it changed."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    changed = 0
    for node in graph.node:
        if node.op_type != "GroupQueryAttention":
            continue
        layer = int(node.input[3].split(".")[1])          # past_key_values.{layer}.key
        names = [f"kv_cache.{layer}.{kind}_scale" for kind in ("key", "value")]
        for name, scale in zip(names, scales[2 * layer:2 * layer + 2]):
            graph.initializer.append(numpy_helper.from_array(scale[:, None, :], name))   # (kv_heads, 1, head_dim)
        inputs = list(node.input) + [""] * (SCALE_INPUTS - len(node.input))
        node.ClearField("input")
        node.input.extend(inputs[:SCALE_INPUTS] + names)
        node.attribute.extend(helper.make_attribute(k, v) for k, v in QUANT_ATTRIBUTES.items())
        changed += 1
    for value in [*graph.input, *graph.output]:
        if value.name.startswith(("past_key_values.", "present.")):
            value.type.tensor_type.elem_type = TensorProto.INT8
    onnx.save(model, str(dst))
    return changed


def kv_agreement(float_decoder, int8_decoder, prompts: list[list[int]], new_tokens: int,
                 calibration_tokens: int) -> KVCacheParity:
    """Teacher-forced: the share of the float cache's greedy tokens that the int8 cache ranks first."""
    from ragrt.decoding.generator import greedy
    hits = total = 0
    for ids in prompts:
        reference = list(greedy(float_decoder, ids, new_tokens))
        if not reference:
            continue
        seq = np.array([ids + reference[:-1]])
        logits, _ = int8_decoder.forward(int8_decoder.empty_state(1), seq, np.ones_like(seq), num_logits=len(reference))
        hits += int((logits[0].argmax(-1) == np.array(reference)).sum())
        total += len(reference)
    return KVCacheParity(agreement=round(hits / max(total, 1), 4), prompts=len(prompts), new_tokens=new_tokens,
                         calibration_tokens=calibration_tokens)
