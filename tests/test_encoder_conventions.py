"""The encoder conventions users bring (tests/tiny.py's ENCODER_CONVENTIONS): bge's CLS pooling and
query instruction, e5's query/passage prefixes. The graph pools as PyTorch does, the manifest records
pooling and prefixes, and the engine puts each prefix before its kind of text."""
import json

import numpy as np
import pytest

from ragrt.errors import RagrtError
from ragrt.export.models import EncoderConventions, encoder_conventions
from ragrt.export.onnx.graphs import export_encoder
from ragrt.retrieval.encoder import TextEncoder

TEXTS = ["lists are mutable", "the json module parses json documents and open returns a file object", "gil"]
BGE_QUERY = "Represent this sentence for searching relevant passages: "


@pytest.fixture(scope="module", params=["bge", "e5"])
def convention(request, tmp_path_factory):
    from tiny import make_encoder
    return request.param, make_encoder(tmp_path_factory.mktemp(request.param), convention=request.param)


def test_conventions_are_read_from_sentence_transformers_files(convention, tiny_encoder_dir):
    name, checkpoint = convention
    assert encoder_conventions(checkpoint) == {"bge": EncoderConventions("cls", BGE_QUERY, ""),
                                               "e5": EncoderConventions("mean", "query: ", "passage: ")}[name]
    assert encoder_conventions(tiny_encoder_dir) == EncoderConventions("mean", "", "")
    assert encoder_conventions(checkpoint, pooling="mean").pooling == "mean"


def test_a_pooling_ragrt_cannot_export_is_refused_with_the_choice(convention, tmp_path):
    import shutil
    _, checkpoint = convention
    copy = tmp_path / "enc"
    shutil.copytree(checkpoint, copy)
    (copy / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_max_tokens": True}))
    with pytest.raises(RagrtError, match="pools by pooling_mode_max_tokens; ragrt exports mean or cls pooling "
                                         r"\(pass --encoder-pooling"):
        encoder_conventions(copy)
    assert encoder_conventions(copy, pooling="cls").pooling == "cls"


def test_graph_pools_as_pytorch_does(convention, tmp_path):
    import torch
    from transformers import AutoModel

    from ragrt.export.parity import torch_embeddings
    name, checkpoint = convention
    pooling = encoder_conventions(checkpoint).pooling
    exp = export_encoder(checkpoint, tmp_path, max_length=64, pooling=pooling)
    got = TextEncoder(exp.model, exp.tokenizer, max_length=64, dim=exp.dim).embed_all(TEXTS)
    np.testing.assert_allclose(got, torch_embeddings(checkpoint, TEXTS, 64, pooling), atol=1e-5)
    if pooling == "cls":        # the first token's state, by hand, and not the mean
        from transformers import AutoTokenizer
        batch = AutoTokenizer.from_pretrained(checkpoint)(TEXTS, padding=True, return_tensors="pt")
        with torch.no_grad():
            cls = AutoModel.from_pretrained(checkpoint).eval()(**batch).last_hidden_state[:, 0]
        np.testing.assert_allclose(got, torch.nn.functional.normalize(cls, dim=-1).numpy(), atol=1e-5)
        assert not np.allclose(got, torch_embeddings(checkpoint, TEXTS, 64, "mean"), atol=1e-3)


def test_encoder_puts_each_kind_of_texts_prefix(convention, tmp_path):
    _, checkpoint = convention
    exp = export_encoder(checkpoint, tmp_path, max_length=64)
    plain = TextEncoder(exp.model, exp.tokenizer, max_length=64, dim=exp.dim)
    prefixed = TextEncoder(exp.model, exp.tokenizer, max_length=64, dim=exp.dim, query_prefix="query: ",
                           passage_prefix="passage: ")
    np.testing.assert_array_equal(prefixed.embed_all(TEXTS), plain.embed_all(["query: " + t for t in TEXTS]))
    np.testing.assert_array_equal(prefixed.embed_all(TEXTS, passages=True),
                                  plain.embed_all(["passage: " + t for t in TEXTS]))
    assert not np.allclose(prefixed.embed_all(TEXTS), plain.embed_all(TEXTS))


def test_bundle_records_and_applies_the_conventions(convention, tiny_corpus, tiny_generator_dir, tmp_path):
    """The index holds passages embedded with the passage prefix, and questions are embedded with the
    query prefix: a hit's score is the cosine of the two prefixed texts."""
    from ragrt import Engine
    from ragrt.export.pipeline import ExportConfig, run_export
    from ragrt.export.index import passage_text
    name, checkpoint = convention
    out = run_export(ExportConfig(corpus=tiny_corpus, out=tmp_path / "b", encoder=checkpoint,
                                  generator=tiny_generator_dir, quantize="fp32", parity_prompts=2, max_context=512,
                                  kv_cache="float32"))
    engine = Engine.open(out, verify=True)
    spec = engine.manifest.encoder
    want = encoder_conventions(checkpoint)
    assert (spec.pooling, spec.query_prefix, spec.passage_prefix) == (want.pooling, want.query_prefix,
                                                                     want.passage_prefix)
    assert engine.manifest.schema_version == 7
    raw = TextEncoder(out / spec.model, out / spec.tokenizer, max_length=spec.max_length, dim=spec.dim)
    question = "How do I copy a list?"
    hit = engine.retrieve(question, k=1)[0]
    q = raw.embed_all([want.query_prefix + question])[0]
    p = raw.embed_all([want.passage_prefix + passage_text(hit)])[0]
    assert hit.score == pytest.approx(float(q @ p), abs=2e-3)      # the f16 index rounds
