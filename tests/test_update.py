"""Incremental corpus updates: `ragrt index add/remove`, generations, live reload, and their failures."""
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from ragrt import Engine
from ragrt.bundle.reader import Bundle
from ragrt.errors import CorpusError, UserInputError
from ragrt.bundle.versions import CORPUS_DIR, update_lock
from ragrt.retrieval.passages import PassageStore
from ragrt.corpus.update import add_documents, remove_ids
import faults

ROOT = Path(__file__).resolve().parents[1]
NEW_DOCS = [
    {"id": "tuple", "title": "Tuples", "text": "A tuple is an immutable sequence. " * 30},
    {"id": "dict", "title": "Dicts", "text": "dict.fromkeys removes duplicates in order."},
]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def passages(bundle: Path) -> dict[str, str]:
    gen = Bundle.open(bundle).generation
    store = PassageStore.open(gen.path, gen.spec.passages)
    return {r.id: r.text for r in (store.get(i) for i in range(len(store)))}


def generations(bundle: Path) -> list[str]:
    return sorted(p.name for p in (bundle / CORPUS_DIR).iterdir() if p.is_dir())


@pytest.fixture
def bundle(tiny_bundle, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))


def test_add_is_what_export_would_have_built(bundle, tiny_corpus, tiny_encoder_dir, tiny_generator_dir, tmp_path):
    """Export of the old corpus plus `index add` of new documents == export of both at once."""
    from ragrt.export.pipeline import ExportConfig, run_export
    new = write_jsonl(tmp_path / "new.jsonl", NEW_DOCS)
    result = add_documents(bundle, new, threads=1)
    both = write_jsonl(tmp_path / "both.jsonl", [json.loads(line) for line in tiny_corpus.read_text().splitlines()]
                       + NEW_DOCS)
    whole = run_export(ExportConfig(corpus=both, out=tmp_path / "whole", encoder=tiny_encoder_dir,
                                    generator=tiny_generator_dir, quantize="fp32", parity_prompts=3, max_context=512))
    assert passages(bundle) == passages(whole)
    assert len([p for p in passages(bundle) if p.startswith("tuple#")]) > 1      # chunked, as export chunks
    assert (result.generation, result.documents, result.passages) == ("gen-000002", 7, len(passages(whole)))
    updated, exported = Engine.open(bundle, threads=1), Engine.open(whole, threads=1)
    for q in ("immutable sequence", "duplicates in order", "the GIL"):
        a, b = updated.retrieve(q, k=5), exported.retrieve(q, k=5)
        assert [h.id for h in a] == [h.id for h in b]
        np.testing.assert_allclose([h.score for h in a], [h.score for h in b], atol=2e-3)   # f16 storage


def test_an_open_engine_sees_updates_without_reopening(bundle, tmp_path):
    engine = Engine.open(bundle, threads=1)
    assert "dict#0" not in {h.id for h in engine.retrieve("dict.fromkeys removes duplicates in order.", k=50)}
    stream = engine.stream("How do I copy a list?", k=2, max_new_tokens=4)     # in flight across both updates
    add_documents(bundle, write_jsonl(tmp_path / "new.jsonl", NEW_DOCS), threads=1)
    hits = engine.retrieve("Dicts\ndict.fromkeys removes duplicates in order.", k=1)     # as passages are embedded
    assert hits[0].id == "dict#0" and hits[0].score == pytest.approx(1.0, abs=1e-2)
    remove_ids(bundle, write_lines(tmp_path / "ids.txt", ["lists", "dict#0"]))
    ids = {h.id for h in engine.retrieve("anything", k=50)}
    assert "dict#0" not in ids and "lists#0" not in ids and "tuple#0" in ids
    assert generations(bundle) == ["gen-000002", "gen-000003"]      # gen 1 is gone, the previous one kept
    "".join(stream)
    assert [s.id for s in stream.answer.sources][0] == "lists#0"    # what it retrieved before the updates
    assert engine.corpus.generation.name == "gen-000003"


def test_requests_running_across_updates_never_fail(bundle, tmp_path):
    """Threads ask while the corpus changes under them: every answer comes whole from one generation."""
    engine = Engine.open(bundle, threads=1)
    states = [set(passages(bundle))]
    stop = threading.Event()
    answers, errors = [], []

    def ask_until_stopped():
        while not stop.is_set():
            try:
                # Every passage retrieved, not only those the tiny context holds (the answer's sources).
                prepared = engine.prepare("copy a list", k=50, max_new_tokens=2)
                "".join(engine.answer_stream(prepared))
                answers.append({s.id for s in prepared.sources})
            except Exception as e:  # any failure at all is what this test looks for
                errors.append(e)

    threads = [threading.Thread(target=ask_until_stopped) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for i, doc in enumerate(NEW_DOCS):
            add_documents(bundle, write_jsonl(tmp_path / f"new{i}.jsonl", [doc]), threads=1)
            states.append(set(passages(bundle)))
        remove_ids(bundle, write_lines(tmp_path / "ids.txt", ["tuple", "gil"]))
        states.append(set(passages(bundle)))
        deadline = len(answers) + 4
        while len(answers) < deadline and not errors:
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors
    assert all(a in states for a in answers)
    assert states[-1] in answers


def write_lines(path: Path, lines) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_remove_by_passage_and_document_keeps_the_rest_exactly(bundle, tmp_path):
    engine = Engine.open(bundle, threads=1)
    before = {h.id: h.score for h in engine.retrieve("Generators yield values lazily", k=50)}
    result = remove_ids(bundle, write_lines(tmp_path / "ids.txt", ["  json  ", "", "gil#0", "gil#0"]))
    assert (result.removed, result.passages, result.documents) == (2, 3, 3)
    after = {h.id: h.score for h in engine.retrieve("Generators yield values lazily", k=50)}
    assert after == {k: v for k, v in before.items() if k not in ("json#0", "gil#0")}   # same stored vectors
    assert set(passages(bundle)) == {"lists#0", "files#0", "gen#0"}
    Bundle.open(bundle, verify=True)


def test_bad_updates_change_nothing(bundle, tmp_path):
    before = passages(bundle)
    cases = [
        (lambda: add_documents(bundle, write_jsonl(tmp_path / "a.jsonl", [NEW_DOCS[0], {"id": "gil", "text": "x"}])),
         r"a\.jsonl:2: document 'gil' is already in the bundle"),
        (lambda: add_documents(bundle, write_jsonl(tmp_path / "b.jsonl", [NEW_DOCS[0], NEW_DOCS[0]])),
         r"b\.jsonl:2: duplicate id 'tuple'"),
        (lambda: add_documents(bundle, write_lines(tmp_path / "c.jsonl", ['{"id": "x", "text": "y"}', "{"])),
         r"c\.jsonl:2: invalid JSON"),
        (lambda: remove_ids(bundle, write_lines(tmp_path / "ids.txt", ["gil", "nope", "lists#7"])),
         r"ids\.txt:2: no passage or document with id 'nope' in the bundle \(2 unknown ids in all\)"),
        (lambda: remove_ids(bundle, write_lines(tmp_path / "blank.txt", ["", "  "])), r"blank\.txt: no ids"),
        (lambda: remove_ids(bundle, write_lines(tmp_path / "all.txt", ["lists", "json", "gil", "files", "gen#0"])),
         r"all\.txt: these ids are every passage in the bundle"),
        (lambda: remove_ids(bundle, tmp_path / "missing.txt"), r"missing\.txt: no such file"),
    ]
    (tmp_path / "bad.txt").write_bytes(b"gil\n\xff\xfe\n")
    cases.append((lambda: remove_ids(bundle, tmp_path / "bad.txt"), r"bad\.txt:2: not UTF-8"))
    for call, message in cases:
        with pytest.raises(CorpusError, match=message):
            call()
    assert passages(bundle) == before and generations(bundle) == ["gen-000001"]


def test_a_failure_at_any_step_leaves_the_old_corpus_or_the_new(bundle, tmp_path, monkeypatch):
    """Fails the k-th fsync or rename of an update, for every k: the kill test's random moments, made exhaustive."""
    new_docs = write_jsonl(tmp_path / "new.jsonl", NEW_DOCS)
    whole, steps, runs = faults.failed_updates(monkeypatch, bundle, tmp_path,
                                               lambda b: add_documents(b, new_docs, threads=1))
    old, new = set(passages(bundle)), set(passages(whole))
    assert steps >= 8
    seen = set()
    for k, b in runs:
        state = set(passages(b))
        assert state in (old, new), k
        seen.add("new" if state == new else "old")
        Bundle.open(b, verify=True)
        if state == old:                              # what the failed update left does not block a retry
            add_documents(b, new_docs, threads=1)
            assert set(passages(b)) == new
    assert seen == {"old", "new"}     # the last fsync comes after the swap


def test_one_update_at_a_time(bundle, tmp_path):
    with update_lock(bundle):
        with pytest.raises(UserInputError, match="another corpus update is running"):
            add_documents(bundle, write_jsonl(tmp_path / "new.jsonl", NEW_DOCS))
    add_documents(bundle, write_jsonl(tmp_path / "new.jsonl", NEW_DOCS))


def test_leftovers_of_a_killed_update_are_removed(bundle, tmp_path):
    """A staging dir and a pointer temp file (killed while writing), a generation renamed but never swapped in."""
    corpus = bundle / CORPUS_DIR
    (corpus / ".gen-abc.tmp").mkdir()
    (corpus / ".gen-abc.tmp" / "vectors.usearch").write_bytes(b"half")
    (corpus / ".CURRENT.123.tmp").write_text("gen-000002 ")
    shutil.copytree(corpus / "gen-000001", corpus / "gen-000002")
    assert set(passages(bundle)) == {"lists#0", "json#0", "gil#0", "files#0", "gen#0"}   # readers ignore both
    add_documents(bundle, write_jsonl(tmp_path / "new.jsonl", NEW_DOCS), threads=1)
    assert generations(bundle) == ["gen-000001", "gen-000002"]
    assert not list(corpus.glob(".*")) and "dict#0" in passages(bundle)


def ragrt(*args):
    return subprocess.run([sys.executable, "-m", "ragrt", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_cli(bundle, tmp_path):
    out = ragrt("index", "add", "--bundle", bundle, "--corpus", write_jsonl(tmp_path / "new.jsonl", NEW_DOCS))
    assert out.returncode == 0, out.stderr
    assert f"now serves gen-000002: 7 documents, {len(passages(bundle))} passages" in out.stdout
    out = ragrt("index", "remove", "--bundle", bundle, "--ids", write_lines(tmp_path / "ids.txt", ["tuple"]))
    assert out.returncode == 0 and "removed" in out.stdout and "6 documents" in out.stdout, out.stderr
    out = ragrt("index", "remove", "--bundle", bundle, "--ids", tmp_path / "ids.txt")
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        f"ragrt: error: {tmp_path / 'ids.txt'}:1: no passage or document with id 'tuple' in the bundle "
        "(1 unknown ids in all); nothing was removed"]
    out = ragrt("index", "add", "--bundle", tmp_path / "nope", "--corpus", tmp_path / "new.jsonl")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and "nope" in out.stderr
    assert "gen-000003" in ragrt("verify", bundle).stdout
