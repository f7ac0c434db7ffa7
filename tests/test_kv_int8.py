"""The int8 KV cache (`ragrt export --kv-cache int8`) on the tiny llama's fused graph: the graph
stores round(x / scale), passage KV turns int8 keys, and blocks keep the graph's own int8."""
import json
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
    """(float-cache decoder, int8-cache decoder, scales) over the same weights."""
    from ragrt.export.onnx.graphs import graph_rotary
    from ragrt.export.quant.kvcache import fit_kv_scales, quantize_kv_graph
    path, spec = tiny_fused_fp32
    spec = replace(spec, **graph_rotary(tiny_generator_dir, path))
    float_decoder = open_decoder(create_session(path, SessionConfig(threads=1)), spec)
    rng = np.random.default_rng(0)
    scales = fit_kv_scales(float_decoder, [_ids(rng, spec.vocab_size, n) for n in (40, 60, 80)])
    out = tmp_path_factory.mktemp("kv-int8") / "model.onnx"
    quantize_kv_graph(path, out, scales)
    int8_spec = replace(spec, kv_dtype="int8", kv_scales="kv_scales.npy")
    return float_decoder, open_decoder(create_session(out, SessionConfig(threads=1)), int8_spec, scales), scales


def _prompt(rng, vocab) -> BlockPrompt:
    return BlockPrompt(tuple(_ids(rng, vocab, 7)), tuple(tuple(_ids(rng, vocab, n)) for n in (9, 14, 5)),
                       tuple(_ids(rng, vocab, 6)))


def test_key_scales_are_shared_by_rotary_pairs(decoders):
    _, int8, scales = decoders
    half = int8.spec.rotary_dim // 2
    np.testing.assert_array_equal(scales[0::2, :, :half], scales[0::2, :, half:2 * half])
    assert scales.dtype == np.float32 and (scales > 0).all()


def test_the_graph_stores_the_float_cache_rounded(decoders):
    """The first layer's keys and values come before any attention, so the int8 graph stores the
    float graph's, rounded (a last-bit difference may move one a step); later layers drift with the
    rounding read back (on random weights, by up to a tenth of the logits' range)."""
    float_decoder, int8, scales = decoders
    ids = _ids(np.random.default_rng(1), int8.spec.vocab_size, 50)
    want, fstate = float_decoder.prefill([ids])
    got, qstate = int8.prefill([ids])
    assert all(q.dtype == np.int8 for q in qstate.buffers.arrays)
    for i in (0, 1):
        f, q = fstate.buffers.arrays[i], qstate.buffers.arrays[i]
        diff = np.abs(q[0, :, :50].astype(int) - quantize(f[0, :, :50], scales[i]).astype(int))
        assert diff.max() <= 1 and diff.mean() < 0.01
    assert 0 < np.abs(got - want).max() <= 0.15 * np.abs(want).max()


def test_the_graph_reads_its_cache_as_int8_times_scale(decoders):
    """A step of the int8 graph over its cache is the float graph's step over that cache dequantized:
    only the new token's own key and value, rounded in one and not the other, differ."""
    float_decoder, int8, scales = decoders
    ids = _ids(np.random.default_rng(7), int8.spec.vocab_size, 40)
    _, qstate = int8.prefill([ids[:-1]])
    fstate = float_decoder.empty_state(1, 64)
    for a, q, scale in zip(fstate.buffers.arrays, qstate.buffers.arrays, scales):
        a[0, :, :39] = dequantize(q[0, :, :39], scale)
    fstate = PackedState(fstate.buffers, fstate.slots, np.array([39]))
    last = np.array([ids[-1]], dtype=np.int64)
    got, _ = int8.step(qstate, last)
    want, _ = float_decoder.step(fstate, last)
    assert np.abs(got - want).max() <= 0.02 * np.abs(want).max()


def test_passage_kv_turns_int8_keys(decoders):
    """Blocks on an int8 cache are kept in int8; assembled (keys turned in float, rounded back) they
    give logits close to the float cache's block mode, and the prompt decodes on from them."""
    float_decoder, int8, scales = decoders
    p = _prompt(np.random.default_rng(2), int8.spec.vocab_size)
    kv = PassageKV(int8, "g")
    assert kv.dtype == np.int8
    got, state = kv.prefill([p])
    want, fstate = PassageKV(float_decoder, "g", dtype=np.float32).prefill([p])
    assert np.abs(got - want).max() <= 0.15 * np.abs(want).max()
    n = len(p.ids) - len(p.tail)          # the prefix and the blocks; keys turned in float, rounded back
    for i in (0, 1):
        f, q = fstate.buffers.arrays[i], state.buffers.arrays[i]
        assert np.abs(q[0, :, :n].astype(int) - quantize(f[0, :, :n], scales[i]).astype(int)).max() <= 1
    gen = Generator(int8, state, got)
    gen.append(got.argmax(-1))
    assert gen.logits.shape == (1, int8.spec.vocab_size)


def test_export_writes_an_int8_cache_bundle_whose_store_answers_as_lazy(tiny_corpus, tiny_encoder_dir,
                                                                        tiny_generator_dir, tmp_path):
    """`ragrt export --kv-cache int8 --passage-kv all`: a schema-6 bundle with its scales and the
    measured agreement; its store holds the graph's own int8 blocks (a quarter of float32's bytes),
    and answers from it are those of blocks computed at question time."""
    from ragrt import Engine
    from ragrt.bundle.reader import Bundle
    from ragrt.decoding.blockstore import BlockStore
    from ragrt.export.pipeline import ExportConfig, run_export
    out = run_export(ExportConfig(corpus=tiny_corpus, out=tmp_path / "bundle", encoder=tiny_encoder_dir,
                                  generator=tiny_generator_dir, quantize="fp32", parity_prompts=3, max_context=512,
                                  passage_kv="all", kv_cache="int8"))
    bundle = Bundle.open(out, verify=True)
    m = bundle.manifest
    assert (m.schema_version, m.generator.kv_dtype, m.generator.kv_scales) == (6, "int8", "generator/kv_scales.npy")
    assert m.parity.kv_cache.agreement >= 0.8 and m.parity.kv_cache.calibration_tokens > 0
    store = BlockStore.open(bundle.generation.path, dtype=np.int8)
    g = m.generator
    assert store.nbytes == store.tokens * 2 * g.num_layers * g.num_kv_heads * g.head_dim        # one byte each
    engine, lazy = Engine.open(out, threads=1), Engine.open(out, threads=1)
    lazy.passage_kv.store = None
    assert engine.decoder.kv_dtype == np.int8
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
