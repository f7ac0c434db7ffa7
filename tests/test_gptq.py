"""GPTQ rounding of the int4 graph (export/gptq.py)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")


def _correlated_inputs(rng, tokens, channels):
    """Calibration and held-out inputs like a layer's: a few directions dominate and some
    channels run large, the same ones in both."""
    basis, scale = rng.standard_normal((8, channels)), rng.uniform(0.5, 4.0, channels)

    def sample():
        x = rng.standard_normal((tokens, 8)) @ basis + 0.1 * rng.standard_normal((tokens, channels))
        return torch.from_numpy(x * scale)
    return sample(), sample()


def test_gptq_rounding_lowers_the_output_error_of_nearest_rounding():
    from ragrt.export.quant.awq import int4_blocks
    from ragrt.export.quant.gptq import _dequantize, round_columns
    rng = np.random.default_rng(0)
    w = torch.from_numpy(rng.standard_normal((48, 128)))
    x_calib, x_held = _correlated_inputs(rng, 600, 128)
    q, scales = round_columns(w, x_calib.T @ x_calib)
    assert q.dtype == torch.int8 and int(q.min()) >= -8 and int(q.max()) <= 7
    assert scales.shape == (48, 4)
    gptq = float((x_held @ (w - _dequantize(q, scales)).T).norm())
    nearest = float((x_held @ (w - int4_blocks(w)).T).norm())
    assert gptq < 0.8 * nearest


def test_pack_int4_is_onnxruntime_matmulnbits_layout():
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    from ragrt.export.quant.gptq import pack_int4
    rng = np.random.default_rng(1)
    k, n, block = 96, 40, 32
    w = rng.standard_normal((k, n)).astype(np.float32)
    packed = np.zeros((n, k // block, block // 2), np.uint8)
    scales = np.zeros(n * (k // block), np.float32)
    zero_points = np.zeros(n * ((k // block + 1) // 2), np.uint8)
    quantize_matmul_4bits(packed, w, scales, zero_points, block, n, k, True)
    values = np.stack([packed & 0xF, packed >> 4], -1).reshape(n, k).astype(np.int8) - 8
    np.testing.assert_array_equal(pack_int4(values), packed)


def test_round_graph_rewrites_every_layer_projection(tiny_generator_dir, tmp_path):
    """The tiny llama's builder int4 graph, rewritten: the graph holds GPTQ's values and still
    decodes; on held-out prompts its logits sit closer to the fp32 graph's than nearest rounding's."""
    pytest.importorskip("onnxruntime_genai")
    import shutil

    import onnx
    from onnx import numpy_helper

    from ragrt.export.quant.gptq import GRAPH_WEIGHTS, round_graph
    from ragrt.bundle.manifest import PACKED_IO
    from ragrt.decoding.packed import length_feed
    from ragrt.export.onnx.graphs import export_generator_fused
    graphs = {q: export_generator_fused(tiny_generator_dir, tmp_path / q, q).model for q in ("fp32", "int4")}
    shutil.copytree(tmp_path / "int4", tmp_path / "gptq")
    rng = np.random.default_rng(2)
    vocab = 96
    calibration = [rng.integers(3, vocab, n).tolist() for n in (60, 80, 50)]
    report = round_graph(tiny_generator_dir, tmp_path / "gptq" / "model.onnx", calibration)
    layers = sum(1 for t in onnx.load(str(graphs["int4"])).graph.initializer if t.name.endswith("qkv_proj.MatMul.weight_Q4"))
    assert report.matrices == layers * len(GRAPH_WEIGHTS) and report.tokens == 190
    assert report.error_ratio < 1.0
    before = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(graphs["int4"])).graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "gptq" / "model.onnx")).graph.initializer}
    changed = [n for n in before if not np.array_equal(before[n], after[n])]
    assert changed and all("layers." in n and ("_Q4" in n or "_scales" in n) for n in changed)

    import onnxruntime as ort
    held = np.array([rng.integers(3, vocab, 40).tolist()])

    def logits(path):
        s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feed = {"input_ids": held, "num_logits": np.array([40]), **length_feed(PACKED_IO, np.array([40]))}
        for i in s.get_inputs():
            if i.name.startswith("past"):
                feed[i.name] = np.zeros((1, 2, 0, 16), np.float32)     # tiny.py: 2 kv heads of 16
        return s.run(["logits"], feed)[0]
    reference = logits(graphs["fp32"])
    assert np.abs(logits(tmp_path / "gptq" / "model.onnx") - reference).mean() < \
        np.abs(logits(graphs["int4"]) - reference).mean()
