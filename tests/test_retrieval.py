import dataclasses
import mmap
import sys

import numpy as np
import pytest

import ragrt.retrieval.encoder as encoder_module
from ragrt.retrieval.encoder import TextEncoder
from ragrt.errors import BundleError, UserInputError
from ragrt.runtime.madvise import file_regions
from ragrt.bundle.manifest import IndexSpec, PassagesSpec
from ragrt.retrieval.retriever import Retriever
from ragrt.retrieval.passages import Passage, PassageStore, write_passage_store
from ragrt.export.index import build_index, embed_passages
from ragrt.export.onnx.graphs import export_encoder
from test_hugepages import vm_flags

TEXTS = ["lists are mutable", "a tuple is immutable", "json parses documents", "",
         "open returns a file object and a with statement closes it " * 5, "generators yield lazily", "gil"]


@pytest.fixture(scope="module")
def exported(tiny_encoder_dir, tmp_path_factory):
    return export_encoder(tiny_encoder_dir, tmp_path_factory.mktemp("enc"), max_length=64)


@pytest.fixture(scope="module")
def encoder(exported):
    return TextEncoder(exported.model, exported.tokenizer, max_length=exported.max_length, dim=exported.dim)


def test_onnx_embedding_equals_pytorch(encoder, tiny_encoder_dir):
    from ragrt.export.parity import torch_embeddings
    np.testing.assert_allclose(encoder.embed_all(TEXTS), torch_embeddings(tiny_encoder_dir, TEXTS, 64), atol=1e-5)


def test_bucketing_keeps_input_order(encoder, monkeypatch):
    one_by_one = np.concatenate([encoder.embed_all([t]) for t in TEXTS])
    batches = list(encoder.embed(TEXTS, batch_size=2))
    assert [b.shape for b in batches] == [(2, encoder.dim)] * 3 + [(1, encoder.dim)]
    assert all(b.dtype == np.float32 for b in batches)
    np.testing.assert_allclose(np.concatenate(batches), one_by_one, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(one_by_one, axis=1), 1.0, atol=1e-5)
    # Windows of 4 texts: the sort must not carry rows across a window boundary.
    monkeypatch.setattr(encoder_module, "BUCKET_WINDOW", 2)
    np.testing.assert_allclose(encoder.embed_all(iter(TEXTS * 2), batch_size=2), np.tile(one_by_one, (2, 1)),
                               atol=1e-5)


def test_encoder_edges(encoder, exported):
    assert encoder.embed_all([]).shape == (0, encoder.dim)
    assert list(encoder.embed([])) == []
    long = encoder.embed_all(["word " * 1000])          # truncated to max_length, not an error
    assert long.shape == (1, encoder.dim)
    with pytest.raises(UserInputError, match="batch_size"):
        encoder.embed(TEXTS, batch_size=0)
    with pytest.raises(BundleError, match="no output 'pooled'"):
        TextEncoder(exported.model, exported.tokenizer, max_length=64, dim=exported.dim, output="pooled")
    with pytest.raises(BundleError, match="not a readable tokenizer"):
        TextEncoder(exported.model, exported.model, max_length=64, dim=exported.dim)


def test_store_round_trip_and_corruption(tmp_path):
    records = [Passage("a#0", "Ünïcode ✓", "text with \"quotes\" and\nnewlines"), Passage("b#0", "", "x"),
               Passage("c#0", "日本語", "")]
    data, offsets = tmp_path / "data.bin", tmp_path / "offsets.npy"
    assert write_passage_store(data, offsets, records) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.bin", "offsets.npy"]
    store = PassageStore.open(tmp_path, PassagesSpec("data.bin", "offsets.npy", 3))
    # Nothing is read whole: the data file is an mmap and the offsets a memmap.
    assert isinstance(store._segments[0], mmap.mmap) and isinstance(store._starts, np.memmap)
    assert len(store) == 3 and [store.get(i) for i in range(3)] == records
    assert list(store.ids()) == ["a#0", "b#0", "c#0"]
    assert store.row_of("b#0") == 1
    with pytest.raises(UserInputError, match="no passage with id"):
        store.row_of("zzz")
    with pytest.raises(UserInputError, match="out of range"):
        store.get(3)
    with pytest.raises(BundleError, match="expected uint64\\[5\\]"):
        PassageStore.open(tmp_path, PassagesSpec("data.bin", "offsets.npy", 4))
    with pytest.raises(BundleError, match="missing"):
        PassageStore.open(tmp_path, PassagesSpec("nope.bin", "offsets.npy", 3))
    data.write_bytes(data.read_bytes() + b"junk")
    with pytest.raises(BundleError, match="offsets do not cover"):
        PassageStore.open(tmp_path, PassagesSpec("data.bin", "offsets.npy", 3))


def test_store_write_failure_keeps_the_old_store(tmp_path):
    data, offsets = tmp_path / "data.bin", tmp_path / "offsets.npy"
    write_passage_store(data, offsets, [Passage("a", "", "old")])

    def broken():
        yield Passage("b", "", "new")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_passage_store(data, offsets, broken())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.bin", "offsets.npy"]
    assert PassageStore.open(tmp_path, PassagesSpec("data.bin", "offsets.npy", 1)).get(0).text == "old"


def test_corrupted_record_is_a_bundle_error(tmp_path):
    data, offsets = tmp_path / "data.bin", tmp_path / "offsets.npy"
    write_passage_store(data, offsets, [Passage("a", "", "x"), Passage("b", "", "y")])
    blob = bytearray(data.read_bytes())
    blob[1] = ord("!")
    data.write_bytes(bytes(blob))
    with pytest.raises(BundleError, match="passage record 0 is corrupted"):
        PassageStore.open(tmp_path, PassagesSpec("data.bin", "offsets.npy", 2)).get(0)


def _build(records, encoder, root, **kw):
    records = list(records)
    return build_index(records, embed_passages(records, encoder, progress=False), index_path=root / "v.usearch",
                       data_path=root / "d.bin", offsets_path=root / "o.npy", progress=False, **kw)


def _specs(built, expansion_search=64):
    return (dataclasses.replace(built.shards[0], expansion_search=expansion_search),
            PassagesSpec("d.bin", "o.npy", built.count))


def test_index_finds_an_exact_passage(encoder, tmp_path):
    records = [Passage(f"p{i}", "", t) for i, t in enumerate(TEXTS) if t]
    built = _build(iter(records), encoder, tmp_path, dtype="f32")     # a one-shot iterator is fine
    assert (built.count, built.ndim, built.dtype, built.metric) == (len(records), encoder.dim, "f32", "cos")
    assert not list(tmp_path.glob("*.tmp*"))
    retriever = Retriever.open(tmp_path, *_specs(built), encoder)
    hits = retriever.retrieve("json parses documents", k=3)
    assert hits[0].id == "p2" and hits[0].row == 2 and hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert len(retriever.retrieve("anything", k=100)) == len(records)
    assert retriever.retrieve("anything", k=0) == []
    batch = retriever.search(encoder.embed_all(["gil", "lists are mutable"]), k=1)
    assert [h[0].id for h in batch] == ["p6", "p0"]
    with pytest.raises(UserInputError, match="query vectors must be"):
        retriever.search(encoder.embed_all(["gil"])[0], k=1)
    with pytest.raises(UserInputError, match="index dtype"):
        build_index(records, np.zeros((len(records), 8), np.float32), index_path=tmp_path / "x", data_path=tmp_path / "y", offsets_path=tmp_path / "z",
                    dtype="f8")


def test_titles_are_embedded_with_the_text(encoder, tmp_path):
    records = [Passage("a", "Lists", "are mutable"), Passage("b", "", "json parses documents")]
    built = _build(records, encoder, tmp_path, dtype="f16")
    hit = Retriever.open(tmp_path, *_specs(built), encoder).retrieve("Lists\nare mutable", k=1)[0]
    assert (hit.id, hit.title, hit.text) == ("a", "Lists", "are mutable")
    assert hit.score == pytest.approx(1.0, abs=1e-2)                  # f16 storage


def test_retriever_open_memory_maps_and_checks_the_manifest(encoder, tmp_path):
    built = _build([Passage(f"p{i}", "", t) for i, t in enumerate(TEXTS)], encoder, tmp_path, dtype="i8")
    retriever = Retriever.open(tmp_path, *_specs(built, expansion_search=77), encoder)
    (index,) = retriever.index.shards
    assert index.expansion_search == 77
    with pytest.raises(RuntimeError, match="immutable"):   # a view of the file, not a loaded copy
        index.add(99, np.ones(encoder.dim, dtype=np.float32))
    if sys.platform.startswith("linux"):                   # read at random: no readahead (VmFlag rr)
        assert file_regions(tmp_path / "v.usearch")
        assert all("rr" in vm_flags(start) for start, _ in file_regions(tmp_path / "v.usearch"))
    _, passages = _specs(built)
    wrong = IndexSpec("v.usearch", "cos", "i8", built.ndim, built.count + 1, 16, 64)
    with pytest.raises(BundleError, match="manifest says 8 of"):
        Retriever.open(tmp_path, wrong, passages, encoder)
    wrong = IndexSpec("missing.usearch", "cos", "i8", built.ndim, built.count, 16, 64)
    with pytest.raises(BundleError, match="not a readable USearch index"):
        Retriever.open(tmp_path, wrong, passages, encoder)
    (tmp_path / "v.usearch").write_bytes(b"garbage" * 100)
    with pytest.raises(BundleError, match="not a readable USearch index"):
        Retriever.open(tmp_path, *_specs(built), encoder)


def test_i8_index_casts_vectors_and_queries_with_its_scale(tmp_path):
    """Anisotropic unit vectors (a few directions plus noise, as embeddings crowd): ragrt's cast keeps
    exact search closer to float32's than usearch's own cast does, for the index and its queries."""
    from usearch.index import Index
    rng = np.random.default_rng(0)
    directions = rng.standard_normal((20, 384)).astype(np.float32)

    def unit(n):
        v = directions[rng.integers(0, 20, n)] + 0.5 * rng.standard_normal((n, 384)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    vectors, queries = unit(3000), unit(50)
    records = [Passage(f"p{i}", "", f"text {i}") for i in range(len(vectors))]
    built = build_index(records, vectors, index_path=tmp_path / "v.usearch", data_path=tmp_path / "d.bin",
                        offsets_path=tmp_path / "o.npy", dtype="i8", progress=False)
    spec = built.shards[0]
    assert spec.i8_scale == pytest.approx(127 / np.quantile(np.abs(vectors), 0.9999), rel=1e-6) and spec.i8_scale > 127
    retriever = Retriever.open(tmp_path, *_specs(built), None)
    assert np.abs(retriever.index.get(np.arange(5)) - vectors[:5]).max() <= 0.5 / spec.i8_scale + 1e-7
    truth = np.argsort(-queries @ vectors.T, axis=1)[:, :10]

    def recall(found):
        return np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)])

    plain = Index(ndim=384, metric="cos", dtype="i8")
    plain.add(np.arange(len(vectors)), vectors)
    theirs = recall(plain.search(queries, 10, exact=True).keys)
    (index,) = retriever.index.shards
    ours = recall(index.search(np.clip(np.rint(queries * spec.i8_scale), -127, 127).astype(np.int8), 10,
                               exact=True).keys)
    assert ours > theirs + 0.03, (ours, theirs)
    hits = retriever.search(queries, 10)
    assert recall([[h.row for h in row] for row in hits]) > theirs      # the engine casts its queries too


def test_passage_embeddings_are_cached_by_encoder_and_content(encoder, monkeypatch, tmp_path):
    from ragrt.export.index import cached_embeddings
    monkeypatch.setenv("RAGRT_CACHE", str(tmp_path))
    records = [Passage("a", "Lists", "are mutable"), Passage("b", "", "json parses documents")]
    first, spent = cached_embeddings(records, encoder, "model-1", progress=False)
    assert spent > 0
    again, spent = cached_embeddings(records, encoder, "model-1", progress=False)
    assert spent == 0 and np.array_equal(first, again)
    _, spent = cached_embeddings(records, encoder, "model-2", progress=False)       # another encoder graph
    assert spent > 0
    edited = [records[0], Passage("b", "", "json parses documents!")]
    vectors, spent = cached_embeddings(edited, encoder, "model-1", progress=False)
    assert spent > 0 and np.array_equal(vectors[0], first[0]) and not np.array_equal(vectors[1], first[1])


def test_search_breadth_widens_with_the_index():
    from ragrt.retrieval.retriever import search_breadth
    assert search_breadth(100_000, 128) == 128 and search_breadth(300_000, 128) == 256
    assert search_breadth(1_000_000, 128) == 512 and search_breadth(50_000_000, 128) == 512
    assert search_breadth(1_000_000, 1024) == 1024          # a manifest's wider value stands
