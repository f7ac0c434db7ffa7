import numpy as np
import pytest

from engine.encoder import TextEncoder
from engine.errors import BundleError, UserInputError
from engine.store import PassageRecord, PassageStore, write_passage_store
from export.cache import cached_dir, content_key
from export.index import build_index
from export.onnx_export import export_encoder

TEXTS = ["lists are mutable", "a tuple is immutable", "json parses documents", "",
         "open returns a file object and a with statement closes it " * 5, "generators yield lazily", "gil"]


@pytest.fixture(scope="module")
def encoder(tiny_encoder_dir, tmp_path_factory):
    exp = export_encoder(tiny_encoder_dir, tmp_path_factory.mktemp("enc"), max_length=64)
    return TextEncoder(exp.model, exp.tokenizer, max_length=exp.max_length, dim=exp.dim)


def test_onnx_embedding_equals_pytorch(encoder, tiny_encoder_dir):
    from export.parity import torch_embeddings
    np.testing.assert_allclose(encoder.embed_all(TEXTS), torch_embeddings(tiny_encoder_dir, TEXTS, 64), atol=1e-5)


def test_bucketing_keeps_input_order(encoder):
    one_by_one = np.concatenate([encoder.embed_all([t]) for t in TEXTS])
    batches = list(encoder.embed(TEXTS, batch_size=2))
    assert [len(b) for b in batches] == [2, 2, 2, 1]
    np.testing.assert_allclose(np.concatenate(batches), one_by_one, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(one_by_one, axis=1), 1.0, atol=1e-5)


def test_store_round_trip_and_corruption(tmp_path):
    records = [PassageRecord("a#0", "Ünïcode ✓", "text with \"quotes\" and\nnewlines"), PassageRecord("b#0", "", "x")]
    data, offsets = tmp_path / "data.bin", tmp_path / "offsets.npy"
    assert write_passage_store(data, offsets, records) == 2
    store = PassageStore.open(data, offsets, count=2)
    assert [store.get(i) for i in range(2)] == records
    assert store.row_of("b#0") == 1
    with pytest.raises(UserInputError, match="no passage with id"):
        store.row_of("zzz")
    with pytest.raises(BundleError, match="expected uint64\\[4\\]"):
        PassageStore.open(data, offsets, count=3)
    data.write_bytes(data.read_bytes() + b"junk")
    with pytest.raises(BundleError, match="offsets do not cover"):
        PassageStore.open(data, offsets, count=2)


def test_index_finds_an_exact_passage(encoder, tmp_path):
    from engine.retrieve import Retriever
    from usearch.index import Index
    records = [PassageRecord(f"p{i}", "", t) for i, t in enumerate(TEXTS) if t]
    built = build_index(records, encoder, index_path=tmp_path / "v.usearch", data_path=tmp_path / "d.bin",
                        offsets_path=tmp_path / "o.npy", dtype="f32", progress=False)
    assert built.count == len(records)
    index = Index.restore(str(tmp_path / "v.usearch"), view=True)
    retriever = Retriever(index, PassageStore.open(tmp_path / "d.bin", tmp_path / "o.npy", count=len(records)), encoder)
    hits = retriever.retrieve("json parses documents", k=3)
    assert hits[0].id == "p2" and hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert len(retriever.retrieve("anything", k=100)) == len(records)
    batch = retriever.search(encoder.embed_all(["gil", "lists are mutable"]), k=1)
    assert [h[0].id for h in batch] == ["p6", "p0"]
    with pytest.raises(UserInputError, match="index dtype"):
        build_index(records, encoder, index_path=tmp_path / "x", data_path=tmp_path / "y", offsets_path=tmp_path / "z",
                    dtype="f8")


def test_cache_builds_once_and_never_exposes_a_failed_build(tmp_path, monkeypatch):
    monkeypatch.setenv("RAGRT_CACHE", str(tmp_path))
    calls = []

    def build(d):
        calls.append(d)
        (d / "x").write_text("built")

    key = content_key("abc")
    first = cached_dir("kind", key, build)
    assert cached_dir("kind", key, build) == first and len(calls) == 1
    assert (first / "x").read_text() == "built"

    def failing(d):
        (d / "partial").write_text("half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        cached_dir("kind", content_key("other"), failing)
    assert sorted(p.name for p in (tmp_path / "kind").iterdir()) == [key]


def test_content_key_follows_content(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"one")
    k1 = content_key(f, "v1")
    assert content_key(f, "v1") == k1 and content_key(f, "v2") != k1
    f.write_bytes(b"two")
    assert content_key(f, "v1") != k1
