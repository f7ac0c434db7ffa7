"""The generator shapes users bring (tests/tiny.py's GENERATOR_SHAPES), built from configs with random
weights: each exports to the fused graph, decodes PyTorch's greedy tokens, and assembles passage KV
as PyTorch reads the same block prompt, its keys turned with each layer's own rotary."""
import json
from dataclasses import asdict, replace

import numpy as np
import pytest

from ragrt.decoding.blocks import BlockPrompt, PassageKV, inv_freq, rotate_keys
from ragrt.decoding.generator import greedy, open_decoder
from ragrt.runtime.sessions import SessionConfig, create_session

pytest.importorskip("onnxruntime_genai")

SHAPES = ("qwen2", "gemma3", "phi3", "llama3-rope")


@pytest.fixture(scope="module", params=SHAPES)
def shape(request, tmp_path_factory):
    """(shape, checkpoint, graph, decoder) of the shape's fused fp32 graph, with its rotary recorded."""
    from tiny import make_generator

    from ragrt.bundle.manifest import ModelSource
    from ragrt.export.onnx.graphs import export_generator_fused, graph_rotary
    from ragrt.export.pipeline import generator_spec
    root = tmp_path_factory.mktemp(request.param)
    checkpoint = make_generator(root / "hf", shape=request.param)
    exp = export_generator_fused(checkpoint, root / "fp32", "fp32")
    meta = {k: v for k, v in asdict(exp).items() if k not in ("model", "tokenizer")}
    rotary, why_not = graph_rotary(checkpoint, exp.model)
    assert why_not == ""
    spec = replace(generator_spec(meta, "", "fp32", 512, ModelSource("tiny", ""), "fused"), **rotary)
    return request.param, checkpoint, exp.model, open_decoder(create_session(exp.model, SessionConfig(threads=1)), spec)


def test_rotary_recorded_per_shape(shape):
    name, _, _, decoder = shape
    spec = decoder.spec
    want = {"qwen2": (16, 16, 1e4, ()), "gemma3": (16, 16, 1e6, (0,)), "phi3": (32, 16, 1e4, ()),
            "llama3-rope": (16, 16, 1e4, ())}[name]
    assert (spec.head_dim, spec.rotary_dim, spec.rotary_base, spec.local_rotary_layers) == want
    if name == "gemma3":
        assert spec.rotary_local_base == 1e4
        assert not np.allclose(inv_freq(spec, 0), inv_freq(spec, 1))
    if name == "llama3-rope":
        # Llama 3's scaling stretches the low frequencies only: the highest stays the base's.
        plain = 1e4 ** (-np.arange(0, 16, 2) / 16)
        assert inv_freq(spec, 1)[0] == plain[0] and (inv_freq(spec, 1)[-1] < plain[-1] / 4)
    else:
        assert spec.rotary_inv_freq == ()


def test_greedy_equals_pytorch(shape, monkeypatch):
    """Prompts longer than Gemma 3's window of 24 check its sliding-window layer too, and cache buffers
    that start shorter than the window (grown 16 positions at a time) its full-length caches."""
    import ragrt.decoding.packed as packed
    from ragrt.export.parity import torch_greedy
    monkeypatch.setattr(packed, "GROW", 16)
    _, checkpoint, _, decoder = shape
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, decoder.spec.vocab_size, n).tolist() for n in (5, 17, 40)]
    assert [list(greedy(decoder, p, 16)) for p in prompts] == torch_greedy(checkpoint, prompts, decoder.spec, 16)


def test_sliding_window_layers_keep_full_length_caches(shape):
    """The window is the attention's mask on a cache as long as the sequence, not a ring buffer."""
    import onnx
    name, _, graph, _ = shape
    attention = [n for n in onnx.load(str(graph), load_external_data=False).graph.node
                 if n.op_type == "GroupQueryAttention"]
    attributes = [{a.name: a.i for a in n.attribute if a.type == onnx.AttributeProto.INT} for n in attention]
    assert [a.get("local_window_size") for a in attributes] == ([24, -1] if name == "gemma3" else [-1, -1])
    assert not any(a.get("sliding_window_cache") for a in attributes)


def test_passage_kv_equals_pytorch_block_reference(shape):
    """Three passage blocks after a prefix, assembled from passage KV, against PyTorch in float64
    reading the same block prompt (sft.block_logits); the prompt is longer than Gemma 3's window."""
    import torch
    from transformers import AutoModelForCausalLM

    from ragrt.export.train.sft import block_logits
    _, checkpoint, _, decoder = shape
    rng = np.random.default_rng(2)
    ids = lambda n: tuple(int(t) for t in rng.integers(3, decoder.spec.vocab_size, n))
    p = BlockPrompt(ids(7), (ids(9), ids(14), ids(5)), ids(6))
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float64).eval()
    with torch.no_grad():
        ref = block_logits(model, p, [])[-1].numpy()
    got, _ = PassageKV(decoder, "g", dtype=np.float32).prefill([p])
    np.testing.assert_allclose(got[0], ref, atol=5e-4)


def test_keys_turn_in_their_rotary_dims_only(shape):
    name, _, _, decoder = shape
    spec = decoder.spec
    assert (spec.rotary_dim < spec.head_dim) == (name == "phi3")
    k = np.random.default_rng(1).standard_normal((2, 3, spec.head_dim))
    for layer in range(spec.num_layers):
        turned = rotate_keys(k, 5, spec, layer)
        np.testing.assert_array_equal(turned[..., spec.rotary_dim:], k[..., spec.rotary_dim:])
        assert not np.allclose(turned[..., :spec.rotary_dim], k[..., :spec.rotary_dim])
        np.testing.assert_allclose(rotate_keys(turned, -5, spec, layer), k, atol=1e-12)


@pytest.mark.parametrize("rope, reason", [
    ({"rope_type": "dynamic", "factor": 2.0}, "'dynamic' rotary scales cos/sin or changes with the length"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}, "'yarn' rotary"),
])
def test_rotary_that_cannot_turn_exactly_is_refused_with_the_reason(rope, reason, tmp_path):
    """The config alone decides it, before any graph is read."""
    from tiny import make_generator

    from ragrt.export.onnx.graphs import graph_rotary
    checkpoint = make_generator(tmp_path / "hf")
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "rope_scaling": rope}))
    fields, why_not = graph_rotary(checkpoint, tmp_path / "no-graph.onnx")
    assert fields == {} and reason in why_not


def test_a_table_that_is_not_the_checkpoints_is_refused(shape, tmp_path):
    """A graph whose rotary table another base made (a checkpoint edited after export) gets no passage KV."""
    from ragrt.export.onnx.graphs import graph_rotary
    _, checkpoint, graph, decoder = shape
    config = json.loads((checkpoint / "config.json").read_text())
    edited = tmp_path / "hf"
    edited.mkdir()
    (edited / "config.json").write_text(json.dumps({**config, "rope_theta": 500.0}))
    fields, why_not = graph_rotary(edited, graph)
    assert fields == {} and "rotary table is not the checkpoint's rotary" in why_not


def test_gemma3_bundle_serves_and_reuses_passage_kv(tiny_corpus, tiny_encoder_dir, tmp_path):
    """Through the export pipeline: the manifest records the local layers (schema 7), and a second
    ask of the same question reuses every passage block, answering the same."""
    from tiny import make_generator

    from ragrt import Engine
    from ragrt.export.pipeline import ExportConfig, run_export
    checkpoint = make_generator(tmp_path / "hf", shape="gemma3")
    out = run_export(ExportConfig(corpus=tiny_corpus, out=tmp_path / "b", encoder=tiny_encoder_dir,
                                  generator=checkpoint, quantize="fp32", parity_prompts=2, max_context=512,
                                  kv_cache="float32"))
    engine = Engine.open(out, verify=True)
    g = engine.manifest.generator
    assert (g.local_rotary_layers, g.rotary_local_base, g.rotary_base) == ((0,), 1e4, 1e6)
    assert engine.manifest.schema_version == 7
    first, second = (engine.ask("How do I copy a list?", k=3, passage_kv="on", max_new_tokens=6) for _ in range(2))
    assert first.passage_kv == {"reused": 0, "computed": 3} and second.passage_kv == {"reused": 3, "computed": 0}
    assert second.answer == first.answer and len(second.sources) == 3


def test_export_refuses_precomputed_passage_kv_it_cannot_turn_exactly(tiny_corpus, tiny_encoder_dir, tmp_path):
    """A yarn rotary scales cos/sin: `--passage-kv all` is refused with that reason."""
    from tiny import make_generator

    from ragrt.errors import UserInputError
    from ragrt.export.pipeline import ExportConfig, run_export
    checkpoint = make_generator(tmp_path / "hf")
    config = json.loads((checkpoint / "config.json").read_text())
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}
    (checkpoint / "config.json").write_text(json.dumps({**config, "rope_scaling": rope}))
    with pytest.raises(UserInputError, match="--passage-kv all cannot serve this generator exactly: its 'yarn' "
                                             "rotary scales cos/sin"):
        run_export(ExportConfig(corpus=tiny_corpus, out=tmp_path / "b", encoder=tiny_encoder_dir,
                                generator=checkpoint, quantize="fp32", parity_prompts=1, max_context=512,
                                kv_cache="float32", passage_kv="all"))
    assert not (tmp_path / "b").exists()
