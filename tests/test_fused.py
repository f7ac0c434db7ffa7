"""The fused generator graph (onnxruntime-genai's builder, --graph fused) on the tiny llama:
its fused attention reads an unpadded cache, and the decoder drives it to PyTorch's greedy tokens."""
import numpy as np
import pytest

from engine.decode import open_decoder
from engine.lookup import PromptLookup
from engine.session import SessionConfig, create_session
from export.quantize import op_counts

pytest.importorskip("onnxruntime_genai")


@pytest.fixture(scope="module")
def fused(tiny_generator_dir, tmp_path_factory):
    """{precision: (model path, spec)}"""
    from dataclasses import asdict

    from engine.manifest import Source
    from export.onnx_export import FUSED_PRECISIONS, export_generator_fused
    from export.pipeline import generator_spec
    out = tmp_path_factory.mktemp("fused")
    graphs = {}
    for q in FUSED_PRECISIONS:
        exp = export_generator_fused(tiny_generator_dir, out / q, q)
        meta = {k: v for k, v in asdict(exp).items() if k not in ("model", "tokenizer")}
        graphs[q] = exp.model, generator_spec(meta, "", q, 512, Source("tiny", ""), "fused")
    return graphs


def test_fused_graph_ops(fused):
    for q, (path, spec) in fused.items():
        ops = op_counts(path)
        assert ops["GroupQueryAttention"] == spec.num_layers
        assert (ops["MatMulNBits"] > 0) == (q not in ("fp32", "fp16"))
        assert spec.cache == "packed" and spec.io.position_ids == ""


def test_fused_fp32_greedy_equals_pytorch(fused, tiny_generator_dir):
    from export.parity import torch_greedy
    path, spec = fused["fp32"]
    decoder = open_decoder(create_session(path, SessionConfig(threads=1)), spec)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, spec.vocab_size, n).tolist() for n in (5, 17, 40)]
    ref = torch_greedy(tiny_generator_dir, prompts, spec, 16)
    assert [list(decoder.greedy(p, 16)) for p in prompts] == ref
    # A batch prefills row by row and steps together, with the same tokens.
    logits, state = decoder.prefill(prompts)
    assert decoder.greedy_batch(logits, state, 16) == ref


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
    assert half.greedy_batch(a, state, 12) == [list(half.greedy(p, 12)) for p in prompts]


def test_drafts_on_a_packed_cache_keep_greedy_output(fused):
    path, spec = fused["fp32"]
    decoder = open_decoder(create_session(path, SessionConfig(threads=1)), spec)
    rng = np.random.default_rng(1)
    for _ in range(4):
        chunk = rng.integers(3, spec.vocab_size, 6).tolist()
        prompt = chunk * 3 + chunk[:3]
        plain = list(decoder.greedy(prompt, 30))
        assert list(decoder.greedy(prompt, 30, PromptLookup(min_ngram=1))) == plain


def test_fused_bundle_answers_in_every_mode(tiny_corpus, tiny_encoder_dir, tiny_generator_dir, tmp_path):
    from engine import Engine
    from export.pipeline import ExportConfig, run_export
    out = run_export(ExportConfig(corpus=tiny_corpus, out=tmp_path / "b", encoder=tiny_encoder_dir,
                                  generator=tiny_generator_dir, quantize="fp32", graph="fused",
                                  parity_prompts=2, max_context=512))
    engine = Engine.open(out, verify=True)
    assert engine.manifest.generator.cache == "packed"
    for mode in ("concat", "token", "sequence"):
        answer = engine.ask("How do I copy a list?", k=3, mode=mode, max_new_tokens=6)
        assert answer.new_tokens > 0 and answer.mode == mode


@pytest.mark.parametrize("grow,row_by_row", [(256, False), (16, False), (16, True)],
                         ids=["roomy", "growing", "growing-row-by-row"])
def test_packed_rows_joining_and_leaving_keep_their_tokens(tiny_fused_fp32, grow, row_by_row, monkeypatch):
    """The batcher merges new rows into free slots, moves rows down as others leave, and the
    buffers grow mid-answer (capacity in steps of 16): every row still gets its greedy tokens."""
    import engine.packed
    from engine.batcher import Batcher
    monkeypatch.setattr(engine.packed, "GROW", grow)
    path, spec = tiny_fused_fp32
    decoder = open_decoder(create_session(path, SessionConfig(threads=1)), spec)
    decoder.row_by_row = row_by_row
    rng = np.random.default_rng(2)
    prompts = [rng.integers(3, spec.vocab_size, n).tolist() for n in (5, 40, 9, 70, 3, 22, 31)]
    limits = [30, 4, 41, 12, 25, 7, 18]
    alone = [list(decoder.greedy(p, n)) for p, n in zip(prompts, limits)]
    batcher = Batcher(decoder, max_batch=3, max_queue=16)
    # All queued at once: three start, and each one that finishes lets the next join.
    streams = [batcher.submit(p, n, deadline_s=60) for p, n in zip(prompts, limits)]
    got = [list(s) for s in streams]
    batcher.close()
    assert got == alone
