"""Sibling weight MatMuls (one input, several weights) merged into one MatMul and a Split.

In the builder's decoder the MLP's gate and up projections both read the post-attention
norm's output. As one MatMulNBits of twice the width, the activation is quantized once
instead of twice and the kernel runs once per layer: int4 decoding ran 4.7% faster on the
development machine (paired runs, 28 of 30 rounds faster), with bit-identical logits. Each
output element is the same dot product over the same blocks, so nothing changes but the
work around it.

Merged: MatMulNBits with equal attributes and no zero points, group indices or bias (the
blocks of each output row are stored row by row, so weights and scales concatenate along
N), and MatMul with 2-D initializer weights (concatenated along the output axis). Anything
else, like the w8a8 graph's MatMulInteger, is left as it is.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from ragrt.export.onnx.graphs import drop_unused

MATMULS = ("MatMul", "MatMulNBits")


def fuse_sibling_matmuls(model) -> int:
    """Merges each group of mergeable weight MatMuls that share an input; returns the groups merged."""
    from onnx import helper, numpy_helper

    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    groups: dict[tuple, list] = defaultdict(list)
    for node in graph.node:
        if (key := _merge_key(node, weights)) is not None:
            groups[key].append(node)
    merged = 0
    replaced: dict[str, list] = {}           # first node's name -> its replacement nodes
    dropped: set[str] = set()
    for nodes in groups.values():
        if len(nodes) < 2:
            continue
        name = nodes[0].name + "/siblings"
        arrays = [[numpy_helper.to_array(weights[n.input[i]]) for n in nodes] for i in range(1, len(nodes[0].input))]
        if nodes[0].op_type == "MatMul":
            widths = [a.shape[1] for a in arrays[0]]
            tensors = [np.concatenate(arrays[0], axis=1)]
            attrs = {}
        else:
            widths = [_attr(n, "N") for n in nodes]
            tensors = [np.concatenate(group, axis=0) for group in arrays]      # weights, scales
            attrs = {a.name: helper.get_attribute_value(a) for a in nodes[0].attribute}
            attrs["N"] = sum(widths)
        names = [f"{name}.{i}" for i in range(len(tensors))]
        graph.initializer.extend(numpy_helper.from_array(t, n) for t, n in zip(tensors, names))
        graph.initializer.append(numpy_helper.from_array(np.array(widths, dtype=np.int64), f"{name}.split"))
        matmul = helper.make_node(nodes[0].op_type, [nodes[0].input[0], *names], [f"{name}/output"], name=name,
                                  domain=nodes[0].domain, **attrs)
        split = helper.make_node("Split", [f"{name}/output", f"{name}.split"], [n.output[0] for n in nodes],
                                 name=f"{name}/Split", axis=-1)
        replaced[nodes[0].name] = [matmul, split]
        dropped.update(n.name for n in nodes[1:])
        merged += 1
    if merged:
        # The merged pair sits where the first sibling was: every sibling reads the same input,
        # and their consumers all come after the first, so the order stays topological.
        nodes = [m for n in graph.node if n.name not in dropped for m in replaced.get(n.name, [n])]
        del graph.node[:]
        graph.node.extend(nodes)
        drop_unused(graph)          # the siblings' own weights
    return merged


def _merge_key(node, weights) -> tuple | None:
    """What a node must share with a sibling to be merged with it; None: never merged."""
    if node.op_type not in MATMULS or node.input[1] not in weights:
        return None
    if node.op_type == "MatMul":
        if len(weights[node.input[1]].dims) != 2:
            return None
        return node.op_type, node.input[0], weights[node.input[1]].data_type
    if len(node.input) != 3 or node.input[2] not in weights:      # zero points, g_idx or bias
        return None
    attrs = tuple(sorted((a.name, a.i) for a in node.attribute if a.name != "N"))
    return node.op_type, node.domain, node.input[0], attrs


def _attr(node, name: str) -> int:
    return next(a.i for a in node.attribute if a.name == name)


def fuse_graph_file(path) -> int:
    """`fuse_sibling_matmuls` on an ONNX file, rewritten in place."""
    import onnx
    model = onnx.load(str(path))
    merged = fuse_sibling_matmuls(model)
    if merged:
        onnx.save(model, str(path))
    return merged
