"""`ragrt export --kv-cache int8`: the generator decodes on an int8 KV cache.

onnxruntime's GroupQueryAttention quantizes the cache itself when told to (k_quant_type and
v_quant_type PER_CHANNEL, kv_cache_bit_width 8, k_scale and v_scale inputs): it stores
round(x / scale) and reads int8 x scale back, so only the graph's cache inputs and outputs
change type. That graph is slow to prefill a long prompt, so it ships as a step graph beside the
float one, both reading one external weights file (`GeneratorSpec.step_model`). The scales are
fitted here, per layer, kv head and channel, from what the float graph writes on calibration
prompts: the largest |value| times VALUE_MARGIN, and for keys the largest norm of each rotary
pair (channels i and i + rotary_dim / 2), which a key keeps at every position, so keys turned by
R(delta) for passage KV stay in range. Scales land in the step graph and in kv_scales.npy (the
runtime quantizes prefilled rows and turns int8 keys with them).
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


def write_step_graph(model: Path, weights: Path, step: Path, scales: np.ndarray) -> int:
    """Moves `model`'s weights into `weights` (beside it) and writes `step`: the same graph over the
    same weights file, every GroupQueryAttention keeping an int8 cache; returns how many it changed."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from ragrt.export.onnx.assemble_graph import externalize_weights
    externalize_weights(model, weights)
    graph_model = onnx.load(str(model), load_external_data=False)   # initializers still point into `weights`
    graph = graph_model.graph
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
    onnx.save(graph_model, str(step))
    return changed


def kv_agreement(float_decoder, decoder, prompts: list[list[int]], new_tokens: int,
                 calibration_tokens: int) -> KVCacheParity:
    """Teacher-forced: the share of the float cache's greedy tokens after the first that `decoder`
    ranks first, reading its step graph's int8 cache (the first comes from the float prefill)."""
    from ragrt.decoding.generator import greedy
    hits = total = 0
    for ids in prompts:
        reference = list(greedy(float_decoder, ids, new_tokens))
        if len(reference) < 2:
            continue
        _, state = decoder.prefill([ids])
        seq = np.array([reference[:-1]], dtype=np.int64)
        logits, _ = decoder.forward(decoder.stepping(state), seq, np.ones_like(seq), num_logits=seq.shape[1])
        hits += int((logits[0].argmax(-1) == np.array(reference[1:])).sum())
        total += len(reference) - 1
    return KVCacheParity(agreement=round(hits / max(total, 1), 4), prompts=len(prompts), new_tokens=new_tokens,
                         calibration_tokens=calibration_tokens)
