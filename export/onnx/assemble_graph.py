"""The assembly graph: the generator's prefill graph with token positions and visibility given.

Passage KV's repair (decoding/blocks.py) recomputes the first tokens of each reused block over
the assembled cache. With the prefill graph alone each block's repair is a run of its own, since
a run's tokens take the positions after the cache and see all of it. onnxruntime's
GroupQueryAttention also takes `position_ids` (rotary positions per token) and `attention_bias`
(added to the scores, indexed by cache position). This graph feeds both to every attention
node, so one run holds every block's repair and the tail: each token at its own place in the
prompt, and seeing only what it would have seen run in order. One run of ~90 tokens costs less
than five short ones (benchmarks/README, "Time to first token and throughput, session 12").

Sliding-window attention (Gemma 3's local layers) counts its window from a token's place in the
cache, which for these tokens is not their place in the prompt, so such graphs get none.
"""
from __future__ import annotations

from pathlib import Path

from ragrt.bundle.manifest import ASSEMBLE_BIAS, ASSEMBLE_POSITIONS

# GroupQueryAttention's inputs 9 and 10 (after query, key, value, the pasts, seqlens_k,
# total_sequence_length and the rotary caches).
POSITION_INPUT, BIAS_INPUT = 9, 10


def externalize_weights(model: Path, weights: Path) -> None:
    """Moves `model`'s weights into `weights` beside it, where a second graph can share them; a
    no-op once they are there."""
    import onnx
    if weights.exists():
        return
    onnx.save(onnx.load(str(model)), str(model), save_as_external_data=True, all_tensors_to_one_file=True,
              location=weights.name, size_threshold=1024)
    weights.chmod(model.stat().st_mode & 0o777)     # onnx creates it owner-only; the bundle's files are alike


def write_assemble_graph(model: Path, weights: Path, out: Path) -> int:
    """Writes `out`: `model` over the same weights file, every GroupQueryAttention fed the graph's new
    inputs `position_ids` (int64, batch x sequence) and `attention_bias` (float, 1 x 1 x sequence x
    total length); returns how many attention nodes it changed, 0 (and writes nothing) where any
    attends within a sliding window."""
    import onnx
    from onnx import TensorProto, helper

    attention = [n for n in onnx.load(str(model), load_external_data=False).graph.node
                 if n.op_type == "GroupQueryAttention"]
    if any(a.name == "local_window_size" and a.i > 0 for n in attention for a in n.attribute):
        return 0
    externalize_weights(model, weights)
    graph_model = onnx.load(str(model), load_external_data=False)   # initializers still point into `weights`
    graph = graph_model.graph
    graph.input.append(helper.make_tensor_value_info(ASSEMBLE_POSITIONS, TensorProto.INT64, ["batch_size", "sequence_length"]))
    graph.input.append(helper.make_tensor_value_info(
        ASSEMBLE_BIAS, TensorProto.FLOAT, [1, 1, "sequence_length", "total_sequence_length"]))
    changed = 0
    for node in graph.node:
        if node.op_type != "GroupQueryAttention":
            continue
        inputs = list(node.input) + [""] * (BIAS_INPUT + 1 - len(node.input))
        if inputs[POSITION_INPUT] or inputs[BIAS_INPUT]:
            raise ValueError(f"{model}: attention node {node.name} already takes positions or a bias")
        inputs[POSITION_INPUT], inputs[BIAS_INPUT] = ASSEMBLE_POSITIONS, ASSEMBLE_BIAS
        node.ClearField("input")
        node.input.extend(inputs)
        changed += 1
    onnx.save(graph_model, str(out))
    return changed
