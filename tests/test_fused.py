"""The fused generator graph (onnxruntime-genai's builder, --graph fused) on the tiny llama:
its fused attention reads an unpadded cache, and the decoder drives it to PyTorch's greedy tokens."""
import numpy as np
import onnx
import pytest
from ragrt.decoding.generator import Generator, greedy, greedy_batch, open_decoder
from ragrt.decoding.lookup import PromptLookup
from ragrt.decoding.sampling import DecodingConfig
from ragrt.runtime.sessions import SessionConfig, create_session
from ragrt.export.quant.quantize import op_counts

pytest.importorskip("onnxruntime_genai")


@pytest.fixture(scope="module")
def fused(tiny_generator_dir, tmp_path_factory):
    """{precision: (model path, spec)}"""
    from dataclasses import asdict

    from ragrt.bundle.manifest import ModelSource
    from ragrt.export.onnx.graphs import FUSED_PRECISIONS, export_generator_fused
    from ragrt.export.pipeline import generator_spec
    out = tmp_path_factory.mktemp("fused")
    graphs = {}
    for q in FUSED_PRECISIONS:
        exp = export_generator_fused(tiny_generator_dir, out / q, q)
        meta = {k: v for k, v in asdict(exp).items() if k not in ("model", "tokenizer")}
        graphs[q] = exp.model, generator_spec(meta, "", q, 512, ModelSource("tiny", ""), "fused")
    return graphs


def test_fused_graph_ops(fused):
    for q, (path, spec) in fused.items():
        ops = op_counts(path)
        assert ops["GroupQueryAttention"] == spec.num_layers
        assert (ops["MatMulNBits"] > 0) == (q not in ("fp32", "fp16"))
        assert spec.cache == "packed" and spec.io.position_ids == ""
        # Row lengths come in as GroupQueryAttention's own inputs, not derived from a mask.
        inputs = {i.name for i in onnx.load(str(path), load_external_data=False).graph.input}
        assert {spec.io.seqlens_k, spec.io.total_sequence_length} <= inputs and "attention_mask" not in inputs
        assert "ReduceSum" not in ops
    # int8's weight blocks are the builder option FUSED_PRECISIONS names (the speed-measured 64).
    nbits = [n for n in onnx.load(str(fused["int8"][0]), load_external_data=False).graph.node
             if n.op_type == "MatMulNBits"]
    assert nbits and {next(a.i for a in n.attribute if a.name == "block_size") for n in nbits} == {64}


def test_fused_fp32_greedy_equals_pytorch(fused, tiny_generator_dir):
    from ragrt.export.parity import torch_greedy
    path, spec = fused["fp32"]
    decoder = open_decoder(create_session(path, SessionConfig(threads=1)), spec)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, spec.vocab_size, n).tolist() for n in (5, 17, 40)]
    ref = torch_greedy(tiny_generator_dir, prompts, spec, 16)
    assert [list(greedy(decoder, p, 16)) for p in prompts] == ref
    # A batch prefills row by row and steps together, with the same tokens.
    logits, state = decoder.prefill(prompts)
    assert greedy_batch(Generator(decoder, state, logits), 16) == ref


def test_fp16_graph_decodes_on_a_float16_cache_near_fp32(fused):
    """The CUDA graph, run here by the CPU provider: float16 cache buffers and logits."""
    import onnx
    path, spec = fused["fp16"]
    inputs = {i.name: i.type.tensor_type.elem_type for i in onnx.load(str(path), load_external_data=False).graph.input}
    assert inputs["past_key_values.0.key"] == onnx.TensorProto.FLOAT16 and spec.kv_dtype == "float16"
    half = open_decoder(create_session(path, SessionConfig(threads=1)), spec)
    full = open_decoder(create_session(fused["fp32"][0], SessionConfig(threads=1)), fused["fp32"][1])
    rng = np.random.default_rng(2)
    prompts = [rng.integers(3, spec.vocab_size, n).tolist() for n in (9, 30)]
    a, state = half.prefill(prompts)
    b, _ = full.prefill(prompts)
    assert a.dtype == np.float16
    assert np.abs(a.astype(np.float32) - b).max() < 0.02 * np.abs(b).max()
    # Rows stepped together get the tokens they get alone.
    assert greedy_batch(Generator(half, state, a), 12) == [list(greedy(half, p, 12)) for p in prompts]


@pytest.mark.parametrize("q", ["fp32", "int8", "int4", "fp16"])
def test_merged_gate_and_up_projections_give_the_same_logits(fused, q, tmp_path):
    import shutil

    from ragrt.export.quant.siblings import fuse_graph_file
    path, spec = fused[q]
    merged = tmp_path / "model.onnx"
    shutil.copyfile(path, merged)
    assert fuse_graph_file(merged) == spec.num_layers
    kind = "MatMulNBits" if q in ("int8", "int4") else "MatMul"
    before, after = op_counts(path), op_counts(merged)
    assert after[kind] == before[kind] - spec.num_layers and after["Split"] == spec.num_layers
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, spec.vocab_size, n).tolist() for n in (7, 25)]

    def run(graph):
        decoder = open_decoder(create_session(graph, SessionConfig(threads=1)), spec)
        logits, state = decoder.prefill(prompts)
        out = [logits]
        for _ in range(6):
            logits, state = decoder.step(state, logits.argmax(-1))
            out.append(logits)
        return np.stack(out)
    assert np.array_equal(run(path), run(merged))


def test_drafts_on_a_packed_cache_keep_greedy_output(fused):
    path, spec = fused["fp32"]
    decoder = open_decoder(create_session(path, SessionConfig(threads=1)), spec)
    rng = np.random.default_rng(1)
    for _ in range(4):
        chunk = rng.integers(3, spec.vocab_size, 6).tolist()
        prompt = chunk * 3 + chunk[:3]
        plain = list(greedy(decoder, prompt, 30))
        assert list(greedy(decoder, prompt, 30, PromptLookup(min_ngram=1))) == plain


def test_fused_bundle_answers_in_every_mode(tiny_corpus, tiny_encoder_dir, tiny_generator_dir, tmp_path):
    from ragrt import Engine
    from ragrt.export.pipeline import ExportConfig, run_export
    out = run_export(ExportConfig(corpus=tiny_corpus, out=tmp_path / "b", encoder=tiny_encoder_dir,
                                  generator=tiny_generator_dir, quantize="fp32", graph="fused",
                                  parity_prompts=2, max_context=512))
    engine = Engine.open(out, verify=True)
    assert engine.manifest.generator.cache == "packed"
    for mode in ("concat", "token", "sequence"):
        answer = engine.ask("How do I copy a list?", k=3, mode=mode, max_new_tokens=6)
        assert answer.new_tokens > 0 and answer.mode == mode


@pytest.mark.parametrize("grow,row_by_row,on_device", [(256, False, False), (16, False, False), (16, True, False),
                                                       (16, False, True)],
                         ids=["roomy", "growing", "growing-row-by-row", "growing-device-buffers"])
def test_packed_rows_joining_and_leaving_keep_their_tokens(tiny_fused_fp32, grow, row_by_row, on_device, monkeypatch):
    """The batcher merges new rows into free slots, moves rows down as others leave, and the
    buffers grow mid-answer (capacity in steps of 16): every row still gets its greedy tokens.
    `on_device` runs the buffers CUDA uses (onnxruntime-allocated, bound by address, copied by
    a graph) on the CPU provider; the tokens alone come from host arrays."""
    import ragrt.decoding.packed as packed
    from ragrt.serve.batcher import Batcher
    monkeypatch.setattr(packed, "GROW", grow)
    path, spec = tiny_fused_fp32
    decoder = open_decoder(create_session(path, SessionConfig(threads=1)), spec)
    decoder.row_by_row = row_by_row
    rng = np.random.default_rng(2)
    prompts = [rng.integers(3, spec.vocab_size, n).tolist() for n in (5, 40, 9, 70, 3, 22, 31)]
    limits = [30, 4, 41, 12, 25, 7, 18]
    alone = [list(greedy(decoder, p, n)) for p, n in zip(prompts, limits)]
    if on_device:
        decoder.kv_device = packed.KVDevice("cpu")
        decoder.cache_prefix(prompts[3][:20])       # copied into each row's slot on the device
        assert [list(greedy(decoder, p, n)) for p, n in zip(prompts, limits)] == alone
    batcher = Batcher(decoder, max_batch=3, max_queue=16)
    # All queued at once: three start, and each one that finishes lets the next join.
    streams = [batcher.submit(p, DecodingConfig(max_new_tokens=n), deadline_s=60) for p, n in zip(prompts, limits)]
    got = [list(s) for s in streams]
    batcher.close()
    assert got == alone
    if on_device:
        assert isinstance(decoder.empty_state(1).buffers, packed.DeviceKVBuffers)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_slot_copy_graph_is_valid_onnx_and_copies_a_slot(dtype):
    """The hand-written ModelProto passes onnx's full check; it copies a slot into a buffer
    of larger and of smaller capacity."""
    import onnx
    import onnxruntime as ort
    from ragrt.decoding.tinygraphs import slot_copy_model
    model = slot_copy_model(np.dtype(dtype))
    onnx.checker.check_model(onnx.load_from_string(model), full_check=True)
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 4)).astype(dtype)
    for capacity in (12, 5):
        kept = min(8, capacity)
        y, = session.run(None, {"x": x, "starts": np.array([0]), "ends": np.array([kept]), "axes": np.array([2]),
                                "pads": np.array([0, 0, 0, 0, 0, 0, capacity - kept, 0])})
        assert y.shape == (1, 3, capacity, 4) and y.dtype == np.dtype(dtype)
        assert (y[:, :, :kept] == x[:, :, :kept]).all() and not y[:, :, kept:].any()


def test_cast_graph_is_valid_onnx_and_widens_blocks_exactly():
    """The hand-written Cast passes onnx's full check, and `widen` gives numpy's float16 -> float32
    conversion bit for bit (a widening cast is exact), on a contiguous block and on a strided view."""
    import onnx
    from ragrt.decoding.blocks import widen
    from ragrt.decoding.tinygraphs import cast_model
    onnx.checker.check_model(onnx.load_from_string(cast_model()), full_check=True)
    kv = (np.random.default_rng(0).standard_normal((6, 3, 17, 8)) * 100).astype(np.float16)
    kv[0, 0, 0, :3] = [np.inf, -0.0, 6e-8]          # infinity, a signed zero, a subnormal
    for block in (kv, kv[:, :, 2:9]):
        wide = widen(block, np.dtype(np.float32))
        assert wide.dtype == np.float32 and wide.shape == block.shape
        assert wide.tobytes() == block.astype(np.float32).tobytes()
    assert widen(kv, np.dtype(np.float16)) is kv


@pytest.mark.skipif("CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers(),
                    reason="needs onnxruntime-gpu and a GPU")
def test_cuda_keeps_the_cache_on_the_device_with_the_same_tokens(fused):
    """On CUDA the cache lives in device memory; answers equal those of host-bound buffers,
    which onnxruntime copies across the bus every step."""
    import ragrt.decoding.packed as packed
    path, spec = fused["fp16"]
    decoder = open_decoder(create_session(path, SessionConfig(device="cuda")), spec)
    assert decoder.kv_device == packed.KVDevice("cuda", 0)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, spec.vocab_size, n).tolist() for n in (7, 33, 20)]
    state = decoder.empty_state(1)
    assert state.buffers.arrays[0].device_name().lower() == "cuda"
    on_device = [list(greedy(decoder, p, 12)) for p in prompts]
    logits, state = decoder.prefill(prompts)
    batched = greedy_batch(Generator(decoder, state, logits), 12)
    decoder.kv_device = None
    assert [list(greedy(decoder, p, 12)) for p in prompts] == on_device
    assert batched == on_device


def test_fused_export_takes_relative_paths(tiny_generator_dir, tmp_path, monkeypatch):
    """`ragrt export --generator runs/x/generator`: the builder runs elsewhere, yet finds it."""
    import os
    from ragrt.export.onnx.graphs import export_generator_fused
    monkeypatch.chdir(tiny_generator_dir.parent)
    exp = export_generator_fused(type(tiny_generator_dir)(tiny_generator_dir.name), type(tmp_path)(os.path.relpath(tmp_path / "g")), "fp32")
    assert (tmp_path / "g" / "model.onnx").is_file() and exp.num_layers == 2
