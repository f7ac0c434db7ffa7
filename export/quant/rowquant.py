"""The w8a8 generator: int8 MatMuls with one activation scale per row (per token), computed at run time.

Each weight MatMul x @ W of the fused fp32 decoder becomes
    x' = x / m                                   (SmoothQuant: m per input channel)
    s = max|x'| / 63 over the row;  xq = round(x' / s) + 64   (uint8, 1..127)
    y = MatMulInteger(xq, Wq, zero point 64) * s * s_w
with Wq = round(m * W / s_w) int8 and one scale s_w per output column. x / m costs nothing
where x is a norm's output (the norm's weight takes 1 / m) or the MLP's gated product (the
up projection's columns do); the attention output is divided explicitly. onnxruntime fuses
the tail into MatMulIntegerToFloat. Its u8s8 GEMM is integer arithmetic, so a row's result
does not depend on the other rows of the pass or on how many tokens the pass holds (the
export still measures batching, prefix and draft exactness).

Measured on SmolLM2-135M, on this machine (2 AVX-512 VNNI cores, 2 threads):
- Speed. One 289 x 576 x 1536 MatMul took 0.82 ms. MatMulNBits int8 took 2.3 ms: its
  int8-compute kernel is no faster than fp32 MatMul at prefill. quantize_dynamic took
  0.96 ms. Time to first token of a 320-token prompt was 181-184 ms, against 300-308 ms for
  the builder's MatMulNBits int8 graph in the same run.
- Quality, teacher-forced top-1 against PyTorch on the 20 parity prompts: 0.912 (the
  builder's int8 scored 0.965, as did fp32 activations with these int8 weights). That is why
  int8 (MatMulNBits) stays the default and this is an option. quantize_dynamic
  gave 0.71, with one scale for the whole activation tensor: a few tokens' large activations
  set every token's scale. Per-row scales without smoothing gave 0.91.
- Quantizing the rows with QuantizeLinear (one block per row) instead of Div, Round, Add and
  Cast gave bit-identical logits and greedy tokens and cut the time to first token of the
  320-token prompt from 222 to 205 ms (medians of 7 alternations in one process).
- Why 7-bit activations: uint8 x int8 products summed in pairs must stay within int16,
  because CPUs without VNNI compute u8s8 with vpmaddubsw, which saturates there. 8-bit
  activations scored 0.935 but are not safe there. 7-bit weights instead (reduce_range)
  scored 0.910. A uint8 x uint8 GEMM never saturates, but ran 2.2x slower.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ragrt.errors import RagrtError
from ragrt.bundle.manifest import GeneratorSpec
from ragrt.decoding.packed import length_feed
from ragrt.decoding.prompt import PromptBuilder
from ragrt.retrieval.passages import Passage, passage_id

from ragrt.export.onnx.graphs import drop_unused

ACT_MAX = 63          # activations in zp +- 63
ZERO_POINT = ACT_MAX + 1
WEIGHT_MAX = 127
SMOOTHING = 0.5       # SmoothQuant's alpha: how much of an input channel's range moves into W

# Activation ranges are calibrated on these, not on the parity prompts that judge the result.
CALIBRATION_PROMPTS: list[tuple[str, list[tuple[str, str]]]] = [
    ("Why does the bridge expand in summer?", [
        ("Thermal expansion", "Most materials expand when heated because their atoms vibrate more and keep a "
         "larger average distance. Bridges have expansion joints so the deck can lengthen on hot days."),
        ("Steel", "Steel is an alloy of iron and carbon. Its coefficient of thermal expansion is about 12 "
         "millionths per kelvin.")]),
    ("What is a hash table?", [
        ("Hash tables", "A hash table maps keys to values. A hash function turns each key into an index of an "
         "array of buckets; collisions are resolved by chaining or open addressing."),
        ("Dictionaries", "Python's dict is a hash table. Since Python 3.7 it keeps insertion order.")]),
    ("How do vaccines work?", [
        ("Immunity", "A vaccine exposes the immune system to a harmless piece or weakened form of a pathogen, "
         "so that memory B and T cells form. A later infection is then met by a fast, strong response.")]),
    ("How do I write a unit test?", [
        ("unittest", "Subclass unittest.TestCase and write methods whose names start with test. Use "
         "assertEqual, assertTrue and assertRaises, and run them with python -m unittest."),
        ("pytest", "pytest discovers functions named test_* and rewrites plain assert statements to show "
         "the values that differ.")]),
    ("What causes tides?", [
        ("Tides", "Tides are the rise and fall of sea levels caused by the gravity of the Moon and the Sun "
         "and the rotation of the Earth. Most coasts see two high tides a day.")]),
    ("How do I read a CSV file?", [
        ("csv", "csv.reader(f) iterates over the rows of a CSV file opened with newline=''. csv.DictReader "
         "maps each row to a dict keyed by the header line."),
        ("pandas", "pandas.read_csv loads a CSV file into a DataFrame, inferring column types.")]),
]


def calibration_prompt_ids(builder: PromptBuilder) -> list[list[int]]:
    return [builder.build(q, [Passage(passage_id(f"calibration-{i}", n), title, text)
                              for n, (title, text) in enumerate(passages)]).ids
            for i, (q, passages) in enumerate(CALIBRATION_PROMPTS)]


def calibration_feeds(prompts: list[list[int]], spec: GeneratorSpec) -> list[dict[str, np.ndarray]]:
    """One prefill feed (empty cache) per prompt, in the graph's input names."""
    feeds = []
    for ids in prompts:
        io, n = spec.io, len(ids)
        feed = {io.input_ids: np.array([ids], np.int64), io.num_logits: np.array([1], np.int64),
                **length_feed(io, np.array([n]))}
        if io.position_ids:
            feed[io.position_ids] = np.arange(n, dtype=np.int64)[None]
        empty = np.zeros((1, spec.num_kv_heads, 0, spec.head_dim), np.float32)
        for layer in range(spec.num_layers):
            feed[io.past_key.format(layer=layer)] = feed[io.past_value.format(layer=layer)] = empty
        feeds.append(feed)
    return feeds


def activation_ranges(model, feeds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-channel max |x| of every weight MatMul's input x over the calibration feeds."""
    import onnx
    import onnxruntime as ort

    names = sorted({x for x, _ in _weight_matmuls(model)})
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    ranges = {n: np.zeros(1, np.float32) for n in names}
    for feed in feeds:
        for n, x in zip(names, session.run(names, feed)):
            ranges[n] = np.maximum(ranges[n], np.abs(x).reshape(-1, x.shape[-1]).max(axis=0))
    return ranges


def _weight_matmuls(model) -> list[tuple[str, str]]:
    """(activation, weight) of each MatMul whose second input is a 2-D initializer."""
    weights = {t.name for t in model.graph.initializer if len(t.dims) == 2}
    return [(n.input[0], n.input[1]) for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]


def _smoothing(model, ranges: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """m per activation: x / m and m * W spread an input channel's range over both.

    Weights also read by another node (a tied embedding table) keep their rows as they are.
    """
    from onnx import numpy_helper
    inits = {t.name: t for t in model.graph.initializer}
    tied = {i for n in model.graph.node if n.op_type != "MatMul" for i in n.input}
    w_range: dict[str, np.ndarray] = {}
    blocked = set()
    for x, w in _weight_matmuls(model):
        if w in tied:
            blocked.add(x)
            continue
        w_range[x] = np.maximum(w_range.get(x, 0), np.abs(numpy_helper.to_array(inits[w])).max(axis=1))
    return {x: (np.maximum(ranges[x], 1e-5) ** SMOOTHING / np.maximum(w, 1e-5) ** (1 - SMOOTHING)).astype(np.float32)
            for x, w in w_range.items() if x not in blocked}


def quantize_columns(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scale = np.abs(w).max(axis=0) / WEIGHT_MAX
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    return np.clip(np.round(w / scale), -WEIGHT_MAX, WEIGHT_MAX).astype(np.int8), scale


NORMS = ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization")


def _fold_smoothing(model, smooth: dict[str, np.ndarray], quantized: set[str]) -> tuple[dict, dict, set]:
    """Where x / m comes for free: {norm weight: m}, {weight: m over its columns}, and those x.

    x = norm(h) * g gives x / m with g / m. x = a * up(h), the MLP's gated product, gives it
    with up's columns over m. Elsewhere (attention output) the graph divides explicitly.
    """
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    only_quantized = {x for x in smooth if all(r.op_type == "MatMul" and r.input[1] in quantized
                                                    for r in readers.get(x, []))}
    gammas, columns, folded = {}, {}, set()
    for x in smooth:
        node = producer.get(x)
        if node is None or x not in only_quantized:
            continue
        if node.op_type in NORMS and node.output[0] == x:
            gamma = node.input[2 if node.op_type.startswith("Skip") else 1]
            if gamma in inits and len(readers[gamma]) == 1:
                gammas[gamma] = smooth[x]
                folded.add(x)
        elif node.op_type == "Mul":
            for factor in node.input:
                up = producer.get(factor)
                if up is not None and up.op_type == "MatMul" and up.input[1] in quantized and len(readers[factor]) == 1:
                    columns[up.input[1]] = smooth[x]
                    folded.add(x)
                    break
    return gammas, columns, folded


def quantize_rows(src: Path, dst: Path, feeds: list[dict[str, np.ndarray]]) -> None:
    """Rewrites every weight MatMul of `src` (see the module doc); writes `dst`."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(src))
    if max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) < 21:
        raise RagrtError(f"{src}: w8a8 needs ONNX opset 21 or later (blocked QuantizeLinear)")
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    smooth = _smoothing(model, activation_ranges(model, feeds))
    matmuls = dict((w, x) for x, w in _weight_matmuls(model))
    gammas, folded_columns, folded = _fold_smoothing(model, smooth, set(matmuls))
    for gamma, m in gammas.items():
        inits[gamma].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(inits[gamma]) / m, gamma))
    added = [numpy_helper.from_array(np.array(v, dtype=d), n) for n, v, d in (
        ("/rowq/axes", [-1], np.int64), ("/rowq/eps", 1e-12, np.float32), ("/rowq/max", float(ACT_MAX), np.float32),
        ("/rowq/zp", ZERO_POINT, np.uint8))]
    rows: dict[str, tuple[str, str]] = {}        # activation -> (uint8 tensor, row scale)
    columns: dict[str, tuple[str, str]] = {}     # weight -> (int8 initializer, column scales)
    nodes = []

    def quantized_rows(x: str, width: int) -> tuple[str, str]:
        if x in rows:
            return rows[x]
        p, source = f"/rowq{x}", x
        if x in smooth and x not in folded:
            added.append(numpy_helper.from_array(1 / smooth[x], f"{p}/smooth"))
            nodes.append(helper.make_node("Mul", [x, f"{p}/smooth"], [f"{p}/smoothed"]))
            source = f"{p}/smoothed"
        # QuantizeLinear with one block per row (opset 21) rounds, shifts and saturates in one
        # kernel: bit-identical to Div, Round, Add and Cast, and several times faster at prefill.
        # Its zero point must have the scale's shape, hence ConstantOfShape.
        nodes.extend([
            helper.make_node("Abs", [source], [f"{p}/abs"]),
            helper.make_node("ReduceMax", [f"{p}/abs", "/rowq/axes"], [f"{p}/absmax"], keepdims=1),
            helper.make_node("Max", [f"{p}/absmax", "/rowq/eps"], [f"{p}/range"]),
            helper.make_node("Div", [f"{p}/range", "/rowq/max"], [f"{p}/scale"]),
            helper.make_node("Shape", [f"{p}/scale"], [f"{p}/rows"]),
            helper.make_node("ConstantOfShape", [f"{p}/rows"], [f"{p}/zp"],
                             value=numpy_helper.from_array(np.array([ZERO_POINT], np.uint8))),
            helper.make_node("QuantizeLinear", [source, f"{p}/scale", f"{p}/zp"], [f"{p}/q"],
                             axis=-1, block_size=width)])
        rows[x] = f"{p}/q", f"{p}/scale"
        return rows[x]

    for node in graph.node:
        w = node.input[1] if node.op_type == "MatMul" and len(node.input) > 1 else None
        if w not in matmuls:
            nodes.append(node)
            continue
        x = node.input[0]
        if w not in columns:
            weight = numpy_helper.to_array(inits[w])
            if x in smooth:
                weight = weight * smooth[x][:, None]
            if w in folded_columns:
                weight = weight / folded_columns[w][None, :]
            wq, ws = quantize_columns(weight)
            added += [numpy_helper.from_array(wq, f"{w}.int8"), numpy_helper.from_array(ws, f"{w}.scale")]
            columns[w] = f"{w}.int8", f"{w}.scale"
        xq, xs = quantized_rows(x, int(inits[w].dims[0]))
        p, y = node.name, node.output[0]
        nodes.extend([
            helper.make_node("MatMulInteger", [xq, columns[w][0], "/rowq/zp"], [f"{p}/int32"], name=f"{p}/Integer"),
            helper.make_node("Cast", [f"{p}/int32"], [f"{p}/float"], to=TensorProto.FLOAT),
            helper.make_node("Mul", [xs, columns[w][1]], [f"{p}/scales"]),
            helper.make_node("Mul", [f"{p}/float", f"{p}/scales"], [y], name=f"{p}/Scale")])

    nodes = _tie_embedding(nodes, columns, added)
    graph.ClearField("node")
    graph.node.extend(nodes)
    graph.initializer.extend(added)
    drop_unused(graph)          # the float weights the integer MatMuls replaced
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))


def _tie_embedding(nodes, columns: dict[str, tuple[str, str]], added: list) -> list:
    """Gather(Transpose(W)) over a quantized LM head W becomes a lookup in W's int8 columns.

    Column v of W is embedding row v and has its own scale, so the table costs a transposed
    int8 copy and no fp32 one.
    """
    from onnx import TensorProto, helper, numpy_helper
    producer = {out: n for n in nodes for out in n.output}
    arrays = {t.name: t for t in added}
    out = []
    for node in nodes:
        src = producer.get(node.input[0]) if node.op_type == "Gather" else None
        if src is None or src.op_type != "Transpose" or src.input[0] not in columns:
            out.append(node)
            continue
        wq, ws = columns[src.input[0]]
        table = f"{wq}.rows"
        added.append(numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(arrays[wq]).T), table))
        p, ids, y = node.name, node.input[1], node.output[0]
        out.extend([
            helper.make_node("Gather", [table, ids], [f"{p}/int8"], name=f"{p}/Rows"),
            helper.make_node("Cast", [f"{p}/int8"], [f"{p}/float"], to=TensorProto.FLOAT),
            helper.make_node("Gather", [ws, ids], [f"{p}/scale"], name=f"{p}/Scales"),
            helper.make_node("Unsqueeze", [f"{p}/scale", "/rowq/axes"], [f"{p}/scale_column"]),
            helper.make_node("Mul", [f"{p}/float", f"{p}/scale_column"], [y], name=f"{p}/Scale")])
    used = {name for n in out for name in n.input}
    return [n for n in out if n.op_type != "Transpose" or any(o in used for o in n.output)]
