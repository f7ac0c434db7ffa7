"""Sharded corpus generations: `ragrt export --shards`, searching the shards as one index, and
`ragrt index add/remove` rewriting only the shards they change."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import faults
from ragrt import Engine
from ragrt.bundle.manifest import IndexSpec
from ragrt.bundle.reader import Bundle
from ragrt.bundle.versions import GENERATION_FILE
from ragrt.cli import main
from ragrt.corpus.update import add_documents, remove_ids
from ragrt.errors import BundleError
from ragrt.retrieval.index import build_index
from ragrt.retrieval.shards import ShardedIndex, receiving_shard, shard_sizes
from test_update import NEW_DOCS, passages, write_jsonl, write_lines

QUESTIONS = ("How do I copy a list?", "parse JSON", "the GIL and threads", "close a file", "lazy values")


@pytest.fixture(scope="module")
def sharded_bundle(tiny_corpus, tiny_encoder_dir, tiny_generator_dir, tmp_path_factory) -> Path:
    """tiny_bundle's corpus in 3 shards: rows 0-1, 2-3 and 4."""
    from ragrt.export.pipeline import ExportConfig, run_export
    return run_export(ExportConfig(corpus=tiny_corpus, out=tmp_path_factory.mktemp("sharded") / "tiny3",
                                   encoder=tiny_encoder_dir, generator=tiny_generator_dir, quantize="fp32",
                                   parity_prompts=3, max_context=512, shards=3))


@pytest.fixture
def bundles(tiny_bundle, sharded_bundle, tmp_path) -> tuple[Path, Path]:
    """Writable copies: (one index, three shards)."""
    return (Path(shutil.copytree(tiny_bundle, tmp_path / "one")),
            Path(shutil.copytree(sharded_bundle, tmp_path / "three")))


def shard_files(bundle: Path) -> list[Path]:
    gen = Bundle.open(bundle).generation
    return [gen.file(s.path) for s in gen.spec.index_shards]


def assert_same_answers(one: Path, three: Path) -> None:
    """Rows are global: each hit's row holds its passage in the store."""
    a, b = Engine.open(one, threads=1), Engine.open(three, threads=1)
    store = b.corpus.get().store
    for q in QUESTIONS:
        x, y = a.retrieve(q, k=5), b.retrieve(q, k=5)
        assert [h.id for h in x] == [h.id for h in y], q
        np.testing.assert_allclose([h.score for h in x], [h.score for h in y], atol=1e-6)
        assert all(store.get(h.row).id == h.id for h in y)
    batch = b.corpus.get().search(b.encoder.embed_all(list(QUESTIONS)), k=3)
    assert [[h.id for h in hits] for hits in batch] == [[h.id for h in a.retrieve(q, k=3)] for q in QUESTIONS]


def test_the_shard_layout():
    assert shard_sizes(5, 3) == [2, 2, 1] and shard_sizes(2, 3) == [1, 1, 0] and shard_sizes(7, 1) == [7]
    assert receiving_shard([2, 2, 1]) == 2 and receiving_shard([2, 2, 4]) == 1 and receiving_shard([3]) == 0


def test_three_shards_answer_as_one_index(tiny_bundle, sharded_bundle):
    one, three = Bundle.open(tiny_bundle), Bundle.open(sharded_bundle)
    spec = three.generation.spec
    assert [s.path for s in spec.index_shards] == ["vectors.000.usearch", "vectors.001.usearch", "vectors.002.usearch"]
    assert [s.count for s in spec.index_shards] == [2, 2, 1] and spec.passages.count == 5
    assert three.manifest.schema_version == 4
    # One shard is the layout from before shards: one vectors.usearch, no `shards` key, version 3.
    assert one.manifest.schema_version == 3 and one.generation.spec.index.path == "vectors.usearch"
    assert "shards" not in json.loads(one.generation.file(GENERATION_FILE).read_text())
    assert sorted(p.name for p in one.generation.path.iterdir()) == [
        "bm25", "generation.json", "offsets.npy", "passages.bin", "vectors.usearch"]
    assert_same_answers(tiny_bundle, sharded_bundle)
    # A row's stored vector is found in whichever shard holds it.
    from ragrt import Engine
    rows = np.arange(5)
    np.testing.assert_array_equal(Engine.open(sharded_bundle).retriever.index.get(rows),
                                  Engine.open(tiny_bundle).retriever.index.get(rows))


def test_add_rewrites_only_the_receiving_shard(bundles, tmp_path):
    one, three = bundles
    before = shard_files(three)
    add_documents(one, write_jsonl(tmp_path / "new.jsonl", NEW_DOCS), threads=1)
    add_documents(three, write_jsonl(tmp_path / "new.jsonl", NEW_DOCS), threads=1)
    after = shard_files(three)
    added = len(passages(one)) - 5
    assert [s.count for s in Bundle.open(three).generation.spec.index_shards] == [2, 2, 1 + added]
    assert [a.stat().st_ino == b.stat().st_ino for a, b in zip(before, after)] == [True, True, False]
    assert after[0].stat().st_nlink == 2                          # one file, in both generations
    assert passages(three) == passages(one)
    assert_same_answers(one, three)
    # The smallest shard now is the middle one: the new rows go between the others'.
    more = write_jsonl(tmp_path / "more.jsonl", [{"id": "set", "title": "Sets", "text": "A set holds unique items."}])
    before = after
    add_documents(one, more, threads=1)
    add_documents(three, more, threads=1)
    after = shard_files(three)
    assert [a.stat().st_ino == b.stat().st_ino for a, b in zip(before, after)] == [True, False, True]
    ids = list(passages(three))
    assert ids.index("set#0") == 4 and ids[:2] == ["lists#0", "json#0"]
    assert_same_answers(one, three)
    Bundle.open(three, verify=True)


def test_remove_rewrites_only_the_shards_that_lose_rows(bundles, tmp_path):
    one, three = bundles
    before = shard_files(three)
    for b in bundles:
        remove_ids(b, write_lines(tmp_path / "ids.txt", ["gil"]))          # row 2: shard 1
    after = shard_files(three)
    assert [a.stat().st_ino == b.stat().st_ino for a, b in zip(before, after)] == [True, False, True]
    assert [s.count for s in Bundle.open(three).generation.spec.index_shards] == [2, 1, 1]
    assert_same_answers(one, three)
    for b in bundles:
        remove_ids(b, write_lines(tmp_path / "ids.txt", ["gen#0"]))        # shard 2's only row
    assert [s.count for s in Bundle.open(three).generation.spec.index_shards] == [2, 1, 0]
    assert set(passages(three)) == {"lists#0", "json#0", "files#0"}
    assert_same_answers(one, three)
    add_documents(three, write_jsonl(tmp_path / "new.jsonl", NEW_DOCS[1:]), threads=1)   # the empty shard fills
    assert [s.count for s in Bundle.open(three).generation.spec.index_shards] == [2, 1, 1]
    Bundle.open(three, verify=True)


def test_verify_and_info_cover_every_shard(bundles, capsys):
    _, three = bundles
    assert main(["verify", str(three)]) == 0
    assert "3 index shards" in capsys.readouterr().out
    assert main(["info", str(three)]) == 0
    assert "shards      3: 2 passages (0.0 MB), 2 passages (0.0 MB), 1 passages (0.0 MB)" in capsys.readouterr().out
    last = shard_files(three)[2]
    blob = bytearray(last.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    last.write_bytes(bytes(blob))
    with pytest.raises(BundleError, match=r"vectors\.002\.usearch.*sha256"):
        Bundle.open(three)
    last.unlink()
    with pytest.raises(BundleError, match=r"vectors\.002\.usearch"):
        Bundle.open(three)


def test_a_failure_at_any_step_leaves_the_old_corpus_or_the_new(sharded_bundle, tmp_path, monkeypatch):
    new_docs = write_jsonl(tmp_path / "new.jsonl", NEW_DOCS)
    whole, steps, runs = faults.failed_updates(monkeypatch, sharded_bundle, tmp_path,
                                               lambda b: add_documents(b, new_docs, threads=1))
    old, new = set(passages(sharded_bundle)), set(passages(whole))
    seen = set()
    for k, b in runs:
        state = set(passages(b))
        assert state in (old, new), k
        seen.add("new" if state == new else "old")
        Bundle.open(b, verify=True)                    # linked shards included
    assert seen == {"old", "new"}


def test_a_reader_from_before_shards_refuses_a_sharded_bundle(tiny_bundle, sharded_bundle, monkeypatch):
    import ragrt.bundle.manifest as manifest
    monkeypatch.setattr(manifest, "SCHEMA_VERSION", 3)
    with pytest.raises(BundleError, match=r"schema_version 4 is newer than this ragrt reads \(3\); upgrade ragrt"):
        Bundle.open(sharded_bundle)
    Bundle.open(tiny_bundle)


def test_shards_recall_at_least_what_one_index_does_at_equal_breadth():
    """HNSW at a narrow beam on 20k random unit vectors, against numpy's exact top 10."""
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((20_000, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = rng.standard_normal((200, 32)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    exact = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
    spec = IndexSpec("x", "cos", "f32", 32, len(vectors), 16, 16)

    def recall(indexes) -> float:
        rows, _ = ShardedIndex(indexes).search(queries, 10)
        return float(np.mean([len(set(r) & set(e)) / 10 for r, e in zip(rows, exact)]))

    one = build_index(vectors, spec, threads=1)
    shards, start = [], 0
    for count in shard_sizes(len(vectors), 4):
        shards.append(build_index(vectors[start:start + count], spec, threads=1))
        start += count
    for index in (one, *shards):
        index.expansion_search = spec.expansion_search
    single, sharded = recall([one]), recall(shards)
    assert 0.3 < single < 0.95                         # a beam narrow enough that recall is at stake
    assert sharded >= single


def test_export_refuses_fewer_than_one_shard(tiny_corpus, tmp_path):
    from ragrt.errors import UserInputError
    from ragrt.export.pipeline import ExportConfig, run_export
    with pytest.raises(UserInputError, match="--shards must be at least 1, got 0"):
        run_export(ExportConfig(corpus=tiny_corpus, out=tmp_path / "b", shards=0))
