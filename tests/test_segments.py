"""Segmented passage stores: `ragrt index add` writes only what it adds (a new data file, a new row
table), links the rest, and publishes without hashing the linked files again."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import faults
from ragrt import Engine
from ragrt.bundle import versions
from ragrt.bundle.manifest import PassagesSpec
from ragrt.bundle.reader import Bundle
from ragrt.bundle.versions import CORPUS_DIR, GENERATION_FILE, POINTER
from ragrt.cli import main
from ragrt.corpus.update import add_documents, remove_ids
from ragrt.errors import BundleError, CorpusError
from ragrt.retrieval.passages import Passage, PassageStore, add_segment, write_passage_store
from test_shards import sharded_bundle  # noqa: F401  (a fixture)
from test_update import NEW_DOCS, write_jsonl, write_lines

MORE = [{"id": "set", "title": "Sets", "text": "A set holds unique items."}]
QUESTIONS = ("How do I copy a list?", "parse JSON", "the GIL and threads", "close a file", "lazy values")


def rows(bundle: Path) -> list[Passage]:
    gen = Bundle.open(bundle).generation
    store = PassageStore.open(gen.path, gen.spec.passages)
    return [store.get(i) for i in range(len(store))]


def record(p: Passage) -> bytes:
    """A record as docs/bundle.md says export writes it."""
    return json.dumps({"id": p.id, "title": p.title, "text": p.text}, ensure_ascii=False,
                      separators=(",", ":")).encode("utf-8")


def inode(path: Path) -> int:
    return path.stat().st_ino


@pytest.fixture
def bundle(tiny_bundle, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))


def test_add_writes_only_the_added_passages_and_links_the_rest(bundle, tmp_path):
    first = Bundle.open(bundle).generation
    old = rows(bundle)
    add_documents(bundle, write_jsonl(tmp_path / "new.jsonl", NEW_DOCS), threads=1)
    second = Bundle.open(bundle).generation
    spec = second.spec.passages
    assert (spec.data, spec.segments, spec.offsets) == ("passages.bin", ("passages.000002.bin",), "rows.npy")
    assert inode(second.file("passages.bin")) == inode(first.file("passages.bin"))
    assert second.file("passages.bin").stat().st_nlink == 2
    assert not second.file("offsets.npy").exists()
    now = rows(bundle)
    added = now[len(old):]                         # one index shard: the new rows come last
    assert now[:len(old)] == old and {p.id.split("#")[0] for p in added} == {"tuple", "dict"}
    assert second.file("passages.000002.bin").read_bytes() == b"".join(map(record, added))
    assert np.load(second.file("rows.npy")).shape == (len(now), 2)
    raw = json.loads(second.file(GENERATION_FILE).read_text())
    assert raw["schema_version"] == 5 and raw["passages"]["segments"] == ["passages.000002.bin"]

    add_documents(bundle, write_jsonl(tmp_path / "more.jsonl", MORE), threads=1)
    third = Bundle.open(bundle).generation
    assert third.spec.passages.segments == ("passages.000002.bin", "passages.000003.bin")
    assert [inode(third.file(rel)) for rel in ("passages.bin", "passages.000002.bin")] == [
        inode(second.file(rel)) for rel in ("passages.bin", "passages.000002.bin")]
    assert third.file("passages.000003.bin").read_bytes() == record(rows(bundle)[-1])
    assert rows(bundle)[:len(now)] == now and rows(bundle)[-1].id == "set#0"
    Bundle.open(bundle, verify=True)


def test_rows_inserted_mid_store_read_back_and_old_passages_score_as_before(sharded_bundle, tmp_path):
    """Three shards: the second addition goes to the middle shard, so its row lies between old ones."""
    bundle = Path(shutil.copytree(sharded_bundle, tmp_path / "b"))
    before = Engine.open(bundle, threads=1)
    scores = {q: {h.id: h.score for h in before.retrieve(q, k=50)} for q in QUESTIONS}
    old = rows(bundle)
    add_documents(bundle, write_jsonl(tmp_path / "new.jsonl", NEW_DOCS), threads=1)    # shard 2, rows 5..
    mid = rows(bundle)
    assert mid[:5] == old
    add_documents(bundle, write_jsonl(tmp_path / "more.jsonl", MORE), threads=1)       # shard 1: row 4
    now = rows(bundle)
    assert now == mid[:4] + [now[4]] + mid[4:] and now[4].id == "set#0"
    assert len(Bundle.open(bundle).generation.spec.passages.segments) == 2
    after = Engine.open(bundle, threads=1)
    store = after.corpus.get().store
    for q in QUESTIONS:
        hits = after.retrieve(q, k=50)
        assert all(store.get(h.row) == Passage(h.id, h.title, h.text) for h in hits)
        assert {h.id: h.score for h in hits if h.id in scores[q]} == scores[q]       # same stored vectors


def test_remove_after_adds_compacts_into_one_data_file(bundle, tmp_path):
    add_documents(bundle, write_jsonl(tmp_path / "new.jsonl", NEW_DOCS), threads=1)
    add_documents(bundle, write_jsonl(tmp_path / "more.jsonl", MORE), threads=1)
    before = rows(bundle)
    linked = Bundle.open(bundle).generation.file("passages.bin")
    remove_ids(bundle, write_lines(tmp_path / "ids.txt", ["gil", "dict", "set#0"]))
    gen = Bundle.open(bundle, verify=True).generation
    spec = gen.spec.passages
    assert (spec.data, spec.offsets, spec.segments) == ("passages.bin", "offsets.npy", ())
    assert sorted(gen.spec.files) == sorted(["offsets.npy", "passages.bin", "vectors.usearch", *gen.spec.bm25.paths])
    assert inode(gen.file("passages.bin")) != inode(linked)
    assert rows(bundle) == [p for p in before if p.id.split("#")[0] not in ("gil", "dict", "set")]
    assert gen.file("passages.bin").read_bytes() == b"".join(map(record, rows(bundle)))
    raw = json.loads(gen.file(GENERATION_FILE).read_text())
    assert raw["schema_version"] == 3 and set(raw["passages"]) == {"count", "data", "offsets"}   # as before segments
    hit = Engine.open(bundle, threads=1).retrieve("A tuple is an immutable sequence.", k=1)[0]
    assert hit.id.startswith("tuple#")


def seal_as_before_segments(bundle: Path) -> None:
    """Rewrites the current generation.json as ragrt wrote it before segments (no schema_version)."""
    gen = Bundle.open(bundle).generation
    raw = json.loads(gen.file(GENERATION_FILE).read_text())
    del raw["schema_version"]
    gen.file(GENERATION_FILE).write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    sha = versions.sha256_file(gen.file(GENERATION_FILE))
    (bundle / CORPUS_DIR / POINTER).write_text(f"{gen.name} {sha}\n")


def test_a_generation_from_before_segments_opens_and_updates(bundle, tmp_path):
    seal_as_before_segments(bundle)
    old = Bundle.open(bundle).generation
    assert old.spec.schema_version == 0 and sorted(old.spec.files) == sorted(
        ["offsets.npy", "passages.bin", "vectors.usearch", *old.spec.bm25.paths])
    before = rows(bundle)
    assert [p.id for p in before] == ["lists#0", "json#0", "gil#0", "files#0", "gen#0"]
    with pytest.raises(CorpusError, match=r"new\.jsonl:1: document 'gil' is already in the bundle"):
        add_documents(bundle, write_jsonl(tmp_path / "new.jsonl", [MORE[0] | {"id": "gil"}]), threads=1)
    add_documents(bundle, write_jsonl(tmp_path / "new.jsonl", NEW_DOCS), threads=1)
    assert rows(bundle)[:5] == before and len(rows(bundle)) > 6
    assert inode(Bundle.open(bundle).generation.file("passages.bin")) == inode(old.file("passages.bin"))
    assert main(["verify", str(bundle)]) == 0


def test_a_reader_from_before_segments_refuses_a_segmented_store(bundle, tmp_path, monkeypatch):
    add_documents(bundle, write_jsonl(tmp_path / "new.jsonl", NEW_DOCS), threads=1)
    gen = Bundle.open(bundle).generation
    spec = gen.spec.passages
    # ragrt before version 5 ignores `segments`, reads one data file, and so refuses the row table:
    expected = rf"rows\.npy: expected uint64\[{spec.count + 1}\], found uint64\[{spec.count}, 2\]"
    with pytest.raises(BundleError, match=expected):
        PassageStore.open(gen.path, PassagesSpec(spec.data, spec.offsets, spec.count))
    # and from now on generation.json's own schema_version says so.
    import ragrt.bundle.manifest as manifest
    monkeypatch.setattr(manifest, "SCHEMA_VERSION", 4)
    with pytest.raises(BundleError, match=r"generation\.json: bundle schema_version 5 is newer than this ragrt reads "
                                          r"\(4\); upgrade ragrt"):
        Bundle.open(bundle)


def hashed_in_staging(monkeypatch) -> list[str]:
    """The names of the files publish hashes while it seals a staging directory."""
    names = []
    real = versions.sha256_file

    def counting(path, *args):
        if Path(path).parent.name.startswith(".gen-"):
            names.append(Path(path).name)
        return real(path, *args)
    monkeypatch.setattr(versions, "sha256_file", counting)
    return names


def test_publish_hashes_only_files_it_did_not_link(sharded_bundle, tmp_path, monkeypatch):
    bundle = Path(shutil.copytree(sharded_bundle, tmp_path / "b"))
    names = hashed_in_staging(monkeypatch)
    add_documents(bundle, write_jsonl(tmp_path / "new.jsonl", NEW_DOCS), threads=1)
    assert sorted(names) == ["passages.000002.bin", "rows.npy", "vectors.002.usearch"]
    names.clear()
    add_documents(bundle, write_jsonl(tmp_path / "more.jsonl", MORE), threads=1)
    assert sorted(names) == ["passages.000003.bin", "rows.npy", "vectors.001.usearch"]
    names.clear()
    # Remove writes passages.bin anew under the name of the linked one: a new file, hashed.
    remove_ids(bundle, write_lines(tmp_path / "ids.txt", ["lists#0"]))
    assert sorted(names) == ["offsets.npy", "passages.bin", "vectors.000.usearch"]
    monkeypatch.undo()
    Bundle.open(bundle, verify=True)            # the entries kept from the old generation are right


def test_publish_hashes_a_linked_path_that_is_another_file(bundle, tmp_path):
    """Same name and size as the old generation's file, but a copy: its entry is computed, not taken."""
    gen = Bundle.open(bundle).generation
    with versions.staging(bundle) as tmp:
        for rel in gen.spec.files:
            (tmp / rel).parent.mkdir(exist_ok=True)
            shutil.copyfile(gen.file(rel), tmp / rel)
        blob = bytearray((tmp / "passages.bin").read_bytes())
        blob[-2] ^= 0x01                          # same size, other bytes
        (tmp / "passages.bin").write_bytes(bytes(blob))
        new = versions.publish(bundle, tmp, number=2, manifest_sha256=gen.spec.manifest_sha256, index=gen.spec.index,
                               passages=gen.spec.passages, documents=gen.spec.documents, linked_from=gen)
    assert new.spec.files["passages.bin"] != gen.spec.files["passages.bin"]
    assert new.spec.files["passages.bin"].sha256 == versions.sha256_file(new.file("passages.bin"))
    assert new.spec.files["vectors.usearch"] == gen.spec.files["vectors.usearch"]     # a copy of the same bytes


@pytest.mark.parametrize("rel", ["passages.bin", "passages.000002.bin", "rows.npy"])
def test_verify_names_a_damaged_segment(bundle, tmp_path, capsys, rel):
    add_documents(bundle, write_jsonl(tmp_path / "new.jsonl", NEW_DOCS), threads=1)
    assert main(["verify", str(bundle)]) == 0
    assert "2 passage segments" in capsys.readouterr().out
    assert main(["info", str(bundle)]) == 0
    out = capsys.readouterr().out
    assert "(schema 5," in out and "segments    2 passage data files" in out
    path = Bundle.open(bundle).generation.file(rel)
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.unlink()                                 # a new file: the hard-linked one is the old generation's too
    path.write_bytes(bytes(blob))
    assert main(["verify", str(bundle)]) == 2
    assert f"{rel}: sha256 does not match" in capsys.readouterr().err
    path.unlink()
    with pytest.raises(BundleError, match=rf"{rel.replace('.', '[.]')}: missing"):
        Bundle.open(bundle)


def test_a_failure_at_any_step_of_a_second_add_leaves_the_old_corpus_or_the_new(bundle, tmp_path, monkeypatch):
    """The first add made a segmented store; the second links two data files and adds a third."""
    add_documents(bundle, write_jsonl(tmp_path / "new.jsonl", NEW_DOCS), threads=1)
    more = write_jsonl(tmp_path / "more.jsonl", MORE)
    whole, steps, runs = faults.failed_updates(monkeypatch, bundle, tmp_path / "runs",
                                               lambda b: add_documents(b, more, threads=1))
    old, new = rows(bundle), rows(whole)
    seen = set()
    for k, b in runs:
        state = rows(b)
        assert state in (old, new), k
        seen.add("new" if state == new else "old")
        Bundle.open(b, verify=True)
        assert (b / CORPUS_DIR / "gen-000002" / "passages.000002.bin").read_bytes() == \
            (bundle / CORPUS_DIR / "gen-000002" / "passages.000002.bin").read_bytes()
    assert seen == {"old", "new"}


# The store on its own.

def store_of(tmp_path: Path, batches: list[list[Passage]], at: list[int]) -> PassageStore:
    """A store written as export, then one segment per further batch, each inserted at its row."""
    root = tmp_path / "g0"
    root.mkdir()
    write_passage_store(root / "passages.bin", root / "offsets.npy", batches[0])
    store = PassageStore.open(root, PassagesSpec("passages.bin", "offsets.npy", len(batches[0])))
    for n, (batch, row) in enumerate(zip(batches[1:], at), start=1):
        nxt = tmp_path / f"g{n}"
        nxt.mkdir()
        for rel in store.spec.data_files:
            (nxt / rel).hardlink_to(root / rel)
        spec = add_segment(store, nxt, segment=f"passages.{n:06d}.bin", rows="rows.npy", records=batch, at=row)
        root, store = nxt, PassageStore.open(nxt, spec)
    return store


def test_segments_read_as_the_rows_they_were_inserted_as(tmp_path):
    a = [Passage(f"a{i}#0", "A", f"first {i}") for i in range(4)]
    b = [Passage("b#0", "", "second"), Passage("b#1", "", "")]
    c = [Passage("c#0", "Ü", "third ✓")]
    store = store_of(tmp_path, [a, b, c, []], at=[1, 6, 0])
    assert [store.get(i) for i in range(len(store))] == [a[0], *b, *a[1:], c[0]]
    assert list(store.ids()) == [p.id for p in [a[0], *b, *a[1:], c[0]]]
    assert store.spec.segments == ("passages.000001.bin", "passages.000002.bin", "passages.000003.bin")
    assert (tmp_path / "g3" / "passages.000003.bin").stat().st_size == 0       # an empty segment is harmless
    assert store.row_of("c#0") == 6


def test_ids_read_every_kind_of_id_as_a_full_parse_does(tmp_path):
    odd = ['quote"#0', "back\\slash#0", "new\nline#0", "tab\t#0", "ünï#0", "😀#1", "#0", 'x","title":"y#0']
    store = store_of(tmp_path, [[Passage(i, "t", "x") for i in odd[:4]], [Passage(i, "", "") for i in odd[4:]]],
                     at=[2])
    assert list(store.ids()) == [store.get(i).id for i in range(len(store))]
    assert sorted(store.ids()) == sorted(odd)


def test_ids_fall_back_to_a_full_parse_for_records_in_another_key_order(tmp_path):
    blobs = [b'{"title":"t","id":"late#0","text":"x"}', b'{"id":"first#0","title":"","text":""}',
             b'{ "id": "spaced#0", "title": "", "text": "" }']
    (tmp_path / "d.bin").write_bytes(b"".join(blobs))
    np.save(tmp_path / "o.npy", np.cumsum([0, *map(len, blobs)]).astype(np.uint64))
    store = PassageStore.open(tmp_path, PassagesSpec("d.bin", "o.npy", 3))
    assert list(store.ids()) == ["late#0", "first#0", "spaced#0"]


def test_a_row_across_two_data_files_or_past_their_end_is_a_bundle_error(tmp_path):
    store = store_of(tmp_path, [[Passage("a#0", "", "x")], [Passage("b#0", "", "y")]], at=[1])
    table = np.load(tmp_path / "g1" / "rows.npy")
    size = (tmp_path / "g1" / "passages.bin").stat().st_size
    for bad in ([2, size + 3], [table[1, 0], table[1, 1] + 1]):    # across the boundary, past the end
        table[0] = bad
        np.save(tmp_path / "g1" / "rows.npy", table)
        broken = PassageStore.open(tmp_path / "g1", store.spec)
        with pytest.raises(BundleError, match="passage record 0 lies outside the passage data"):
            broken.get(0)
        with pytest.raises(BundleError, match="passage record 0"):
            list(broken.ids())


def test_add_segment_never_writes_into_an_existing_file(tmp_path):
    store = store_of(tmp_path, [[Passage("a#0", "", "x")]], at=[])
    before = (tmp_path / "g0" / "passages.bin").read_bytes()
    with pytest.raises(FileExistsError):
        add_segment(store, tmp_path / "g0", segment="passages.bin", rows="r.npy", records=[Passage("b", "", "")], at=0)
    with pytest.raises(FileExistsError):
        add_segment(store, tmp_path / "g0", segment="new.bin", rows="passages.bin", records=[Passage("b", "", "")],
                    at=0)
    assert (tmp_path / "g0" / "passages.bin").read_bytes() == before
