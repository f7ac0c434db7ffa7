"""The int8 KV cache (`ragrt export --kv-cache int8`) on the tiny llama's fused graph: a step graph
over the same weights stores round(x / scale); prompts prefill in float and are quantized when they
start stepping; passage KV keeps float blocks; schema-6 bundles, whose only graph is int8, still decode."""
import json
import shutil
from dataclasses import replace

import numpy as np
import pytest

from ragrt.bundle.manifest import Manifest
from ragrt.decoding.blocks import BlockPrompt, PassageKV
from ragrt.decoding.generator import Generator, open_decoder
from ragrt.decoding.kvquant import dequantize, quantize
from ragrt.decoding.packed import PackedState
from ragrt.errors import BundleError
from ragrt.runtime.sessions import SessionConfig, create_session

pytest.importorskip("onnxruntime_genai")


def _ids(rng, vocab, n) -> list[int]:
    return [int(t) for t in rng.integers(3, vocab, n)]


@pytest.fixture(scope="module")
def decoders(tiny_fused_fp32, tiny_generator_dir, tmp_path_factory):
    """(float decoder, decoder with the int8 step graph, the step graph alone as schema 6 ran it, scales)."""
    from ragrt.export.onnx.graphs import graph_rotary
    from ragrt.export.quant.kvcache import fit_kv_scales, write_step_graph
    path, spec = tiny_fused_fp32
    spec = replace(spec, **graph_rotary(tiny_generator_dir, path)[0])
    root = tmp_path_factory.mktemp("kv-int8")
    model = root / "model.onnx"
    shutil.copy(path, model)
    float_decoder = open_decoder(create_session(model, SessionConfig(threads=1)), spec)
    rng = np.random.default_rng(0)
    scales = fit_kv_scales(float_decoder, [_ids(rng, spec.vocab_size, n) for n in (40, 60, 80)])
    assert write_step_graph(model, root / "model.onnx.data", root / "step.onnx", scales) == spec.num_layers
    step = create_session(root / "step.onnx", SessionConfig(threads=1))
    with_steps = open_decoder(create_session(model, SessionConfig(threads=1)),
                              replace(spec, step_model="step.onnx", kv_scales="kv_scales.npy"), scales, step)
    int8_only = open_decoder(step, replace(spec, kv_dtype="int8", kv_scales="kv_scales.npy"), scales)
    return float_decoder, with_steps, int8_only, scales


def _prompt(rng, vocab) -> BlockPrompt:
    return BlockPrompt(tuple(_ids(rng, vocab, 7)), tuple(tuple(_ids(rng, vocab, n)) for n in (9, 14, 5)),
                       tuple(_ids(rng, vocab, 6)))


def test_key_scales_are_shared_by_rotary_pairs(decoders):
    *_, scales = decoders
    half = decoders[0].spec.rotary_dim // 2
    np.testing.assert_array_equal(scales[0::2, :, :half], scales[0::2, :, half:2 * half])
    assert scales.dtype == np.float32 and (scales > 0).all()


def test_prompts_prefill_in_float_and_are_quantized_when_they_step(decoders):
    """The first token is the float graph's own (the weights moved into an external file unchanged);
    the cache the step graph then reads is the float cache rounded, row by row."""
    float_decoder, with_steps, _, scales = decoders
    rng = np.random.default_rng(1)
    prompts = [_ids(rng, float_decoder.spec.vocab_size, n) for n in (50, 23)]
    want, fstate = float_decoder.prefill(prompts)
    got, state = with_steps.prefill(prompts)
    np.testing.assert_array_equal(got, want)
    assert state.buffers.dtype == np.float32
    stepped = with_steps.stepping(state)
    for f, q, scale in zip(fstate.buffers.arrays, stepped.buffers.arrays, scales):
        for row, n in enumerate((50, 23)):
            np.testing.assert_array_equal(q[row, :, :n], quantize(f[row, :, :n], scale))


def test_the_step_graph_reads_its_cache_as_int8_times_scale(decoders):
    """A step of the int8 graph is the float graph's step over that cache dequantized: only the new
    token's own key and value, rounded in one and not the other, differ. It stores them rounded."""
    float_decoder, with_steps, _, scales = decoders
    ids = _ids(np.random.default_rng(7), float_decoder.spec.vocab_size, 40)
    _, state = with_steps.prefill([ids[:-1]])
    state = with_steps.stepping(state)
    fstate = float_decoder.empty_state(1, 64)
    for a, q, scale in zip(fstate.buffers.arrays, state.buffers.arrays, scales):
        a[0, :, :39] = dequantize(q[0, :, :39], scale)
    fstate = PackedState(fstate.buffers, fstate.slots, np.array([39]))
    last = np.array([ids[-1]], dtype=np.int64)
    got, after = with_steps.step(state, last)
    want, fafter = float_decoder.step(fstate, last)
    assert after.buffers.dtype == np.int8 and 0 < np.abs(got - want).max() <= 0.02 * np.abs(want).max()
    for i in (0, 1):    # the first layer's new key and value come before any attention reads the cache
        new = after.buffers.arrays[i][0, :, 39:40].astype(int)
        assert np.abs(new - quantize(fafter.buffers.arrays[i][0, :, 39:40], scales[i]).astype(int)).max() <= 1


def test_rows_joining_a_stepping_batch_are_quantized(decoders):
    """The batcher's pattern: a prefilled row merges into rows already on the int8 cache, and then
    decodes as it would alone."""
    _, with_steps, _, _ = decoders
    rng = np.random.default_rng(3)
    a, b = (_ids(rng, with_steps.spec.vocab_size, n) for n in (30, 45))
    gen = Generator(with_steps)
    gen.add_prompts([a])
    gen.append(gen.logits.argmax(-1))
    gen.add_prompts([b])
    assert gen.state.buffers.dtype == np.int8
    gen.append(gen.logits.argmax(-1))
    alone = Generator(with_steps)
    alone.add_prompts([b])
    alone.append(alone.logits.argmax(-1))
    np.testing.assert_allclose(gen.logits[1], alone.logits[0], rtol=1e-4, atol=1e-4)


def test_passage_kv_on_a_step_graph_is_the_float_graphs(decoders):
    """Blocks come from the float graph and stay float16; the first token is the float bundle's, and
    the row then decodes on the int8 cache."""
    float_decoder, with_steps, _, _ = decoders
    p = _prompt(np.random.default_rng(2), float_decoder.spec.vocab_size)
    kv = PassageKV(with_steps, "g")
    assert kv.dtype == np.float16
    got, state = kv.prefill([p])
    want, _ = PassageKV(float_decoder, "g").prefill([p])
    np.testing.assert_array_equal(got, want)
    gen = Generator(with_steps, state, got)
    gen.append(got.argmax(-1))
    assert gen.state.buffers.dtype == np.int8 and gen.logits.shape == (1, with_steps.spec.vocab_size)


def test_a_schema_6_int8_graph_still_decodes_and_keeps_int8_blocks(decoders):
    """Bundles written before step graphs: the int8 graph prefills too, and passage KV turns int8 keys
    in float, giving logits close to the float cache's block mode."""
    float_decoder, _, int8_only, scales = decoders
    p = _prompt(np.random.default_rng(4), float_decoder.spec.vocab_size)
    kv = PassageKV(int8_only, "g")
    assert kv.dtype == np.int8
    got, state = kv.prefill([p])
    want, fstate = PassageKV(float_decoder, "g", dtype=np.float32).prefill([p])
    assert state.buffers.dtype == np.int8 and np.abs(got - want).max() <= 0.15 * np.abs(want).max()
    n = len(p.ids) - len(p.tail)
    for i in (0, 1):
        f, q = fstate.buffers.arrays[i], state.buffers.arrays[i]
        assert np.abs(q[0, :, :n].astype(int) - quantize(f[0, :, :n], scales[i]).astype(int)).max() <= 1
    gen = Generator(int8_only, state, got)
    gen.append(got.argmax(-1))
    assert gen.logits.shape == (1, int8_only.spec.vocab_size)


def test_export_writes_a_step_graph_bundle_whose_store_answers_as_lazy(tiny_corpus, tiny_encoder_dir,
                                                                       tiny_generator_dir, tmp_path):
    """`ragrt export --kv-cache int8 --passage-kv all`: the step graph beside the graph, one weights
    file for both, the scales and the measured agreement; older readers see a float bundle (schema 3).
    Its store holds float16 blocks from the float graph, and answers from it are those of blocks
    computed at question time."""
    from ragrt import Engine
    from ragrt.bundle.reader import Bundle
    from ragrt.decoding.blockstore import BlockStore
    from ragrt.export.pipeline import ExportConfig, run_export
    out = run_export(ExportConfig(corpus=tiny_corpus, out=tmp_path / "bundle", encoder=tiny_encoder_dir,
                                  generator=tiny_generator_dir, quantize="fp32", parity_prompts=3, max_context=512,
                                  passage_kv="all", kv_cache="int8"))
    bundle = Bundle.open(out, verify=True)
    m = bundle.manifest
    g = m.generator
    assert (m.schema_version, g.kv_dtype, g.step_model, g.kv_scales) == (
        3, "float32", "generator/step.onnx", "generator/kv_scales.npy")
    assert g.weights in m.files and m.files[g.weights].bytes > 10 * m.files[g.model].bytes
    assert m.parity.kv_cache.agreement >= 0.8 and m.parity.kv_cache.calibration_tokens > 0
    store = BlockStore.open(bundle.generation.path)
    assert store.nbytes == store.tokens * 2 * g.num_layers * g.num_kv_heads * g.head_dim * 2      # float16
    engine, lazy = Engine.open(out, threads=1), Engine.open(out, threads=1)
    lazy.passage_kv.store = None
    assert engine.decoder.step_dtype == np.int8
    computed = 0
    for q in ("How do I copy a list?", "What does the GIL do?"):
        a, b = (e.ask(q, k=3, passage_kv="on", max_new_tokens=10) for e in (engine, lazy))
        assert a.answer == b.answer and a.passage_kv == {"reused": 3, "computed": 0}
        computed += b.passage_kv["computed"]
        assert engine.ask(q, k=3, passage_kv="off", max_new_tokens=4).new_tokens > 0
    assert computed >= 3
    raw = json.loads((out / "manifest.json").read_text())
    raw["generator"]["kv_scales"] = ""
    with pytest.raises(BundleError, match="an int8 KV cache needs a packed graph and its kv_scales"):
        Manifest.from_json(json.dumps(raw))


def test_auto_leaves_out_a_step_graph_that_disagrees(tiny_corpus, tiny_encoder_dir, tiny_generator_dir, tmp_path,
                                                     monkeypatch):
    """`--kv-cache auto` below its agreement floor: no step graph, no scales, a float bundle that
    records no int8 figures (the weights stay in their external file, which the manifest lists)."""
    from ragrt import Engine
    from ragrt.bundle.reader import Bundle
    from ragrt.export import pipeline
    monkeypatch.setattr(pipeline, "KV_AUTO_AGREEMENT", 1.01)
    out = pipeline.run_export(pipeline.ExportConfig(corpus=tiny_corpus, out=tmp_path / "bundle", encoder=tiny_encoder_dir,
                                                    generator=tiny_generator_dir, quantize="fp32", parity_prompts=3,
                                                    max_context=512))
    m = Bundle.open(out, verify=True).manifest
    assert (m.generator.step_model, m.generator.kv_scales, m.parity.kv_cache) == ("", "", None)
    assert not (out / "generator" / "step.onnx").exists() and not (out / "generator" / "kv_scales.npy").exists()
    engine = Engine.open(out, threads=1)
    assert engine.decoder.step_dtype == np.float32
    assert engine.ask("How do I copy a list?", k=2, max_new_tokens=4).new_tokens > 0


def test_an_int4_step_graph_runs_small_passes_on_the_cache_the_int8_graph_prefilled(
        tiny_corpus, tiny_encoder_dir, tiny_generator_dir, tmp_path, monkeypatch):
    """`--step-weights int4`: a second step graph with its own int4 weights file, listed and checksummed,
    runs passes of at most `int4_step_rows` rows; prompts still prefill on the int8 graph, so the first
    token is unchanged, and larger batches step on the int8 weights. The tiny random llama's int4 agrees
    too little to pass the export's floor (0.59 against 0.8), so the export refuses it until the floor
    is lowered."""
    import onnx

    from ragrt import Engine
    from ragrt.bundle.reader import Bundle
    from ragrt.errors import RagrtError
    from ragrt.export import pipeline
    common = dict(corpus=tiny_corpus, encoder=tiny_encoder_dir, generator=tiny_generator_dir, quantize="int8",
                  parity_prompts=3, max_context=512)
    with pytest.raises(RagrtError, match="export with --step-weights shared"):
        pipeline.run_export(pipeline.ExportConfig(out=tmp_path / "refused", step_weights="int4", **common))
    assert not (tmp_path / "refused").exists()
    monkeypatch.setattr(pipeline, "MIN_QUANT_AGREEMENT", 0.0)
    shared = pipeline.run_export(pipeline.ExportConfig(out=tmp_path / "shared", **common))
    out = pipeline.run_export(pipeline.ExportConfig(out=tmp_path / "int4", step_weights="int4", **common))
    m = Bundle.open(out, verify=True).manifest
    g = m.generator
    assert (g.quantization, g.step_model, g.int4_step_model, g.int4_step_rows) == (
        "int8", "generator/step.onnx", "generator/step_int4.onnx", pipeline.INT4_STEP_ROWS)
    assert {g.weights, g.int4_step_model, g.int4_step_weights} <= set(m.files)
    assert 0 < m.parity.kv_cache.int4_agreement < 1
    step = onnx.load(str(out / g.int4_step_model), load_external_data=False)
    bits = {a.i for n in step.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"}
    assert bits == {4}
    locations = {e.value for t in step.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"step_int4.onnx.data"}
    plain = Bundle.open(shared).manifest
    assert (plain.generator.int4_step_model, plain.parity.kv_cache.int4_agreement) == ("", 0.0)

    a, b = Engine.open(shared, threads=1), Engine.open(out, threads=1)
    small, large = b.decoder.int4_step_session, b.decoder.step_session
    assert small is not None and a.decoder.int4_step_session is None
    ran = []
    for session in (small, large):
        monkeypatch.setattr(session, "run_with_iobinding", lambda io, s=session, f=session.run_with_iobinding:
                            (ran.append(s), f(io))[1])
    for q in ("How do I copy a list?", "What does the GIL do?"):
        x, y = (e.ask(q, k=2, passage_kv="off", max_new_tokens=1, mode="concat") for e in (a, b))
        assert x.answer == y.answer
        ran.clear()
        assert b.ask(q, k=2, passage_kv="off", max_new_tokens=8, mode="concat").new_tokens > 1
        assert ran and all(s is small for s in ran)
    rng = np.random.default_rng(0)
    prompts = [_ids(rng, g.vocab_size, 12) for _ in range(g.int4_step_rows + 1)]
    for rows, graph in ((g.int4_step_rows, small), (g.int4_step_rows + 1, large)):
        _, state = b.decoder.prefill(prompts[:rows])
        ran.clear()
        b.decoder.step(state, np.full(rows, 5, dtype=np.int64))
        assert ran == [graph]


def test_int4_step_weights_need_the_int8_cache(tiny_corpus, tmp_path):
    from ragrt.errors import UserInputError
    from ragrt.export.pipeline import ExportConfig, run_export
    for bad in (dict(kv_cache="float32"), dict(quantize="int4"), dict(graph="optimum")):
        with pytest.raises(UserInputError, match="--step-weights int4"):
            run_export(ExportConfig(corpus=tiny_corpus, out=tmp_path / "b", step_weights="int4", **bad))
    assert not (tmp_path / "b").exists()
