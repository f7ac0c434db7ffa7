"""`ragrt index add` killed with SIGKILL at random moments leaves the old corpus or the new one, never a mix."""
import json
import random
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from ragrt.bundle.reader import Bundle
from ragrt.cli import main
from ragrt.errors import CorpusError
from ragrt.bundle.versions import CORPUS_DIR
from ragrt.retrieval.passages import PassageStore
from ragrt.corpus.update import add_documents

ROOT = Path(__file__).resolve().parents[1]
RUNS = 24
SEED = 6


def passage_ids(bundle: Path) -> frozenset[str]:
    gen = Bundle.open(bundle).generation
    store = PassageStore.open(gen.path, gen.spec.passages)
    return frozenset(store.get(i).id for i in range(len(store)))


def index_add(bundle: Path, corpus: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ragrt", "index", "add", "--bundle", str(bundle),
                             "--corpus", str(corpus), "--threads", "1"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_kill_during_index_add(tiny_bundle, tmp_path, capsys):
    corpus = tmp_path / "new.jsonl"
    # Enough text that chunking, embedding and writing take a good share of the run, not just imports.
    corpus.write_text("".join(json.dumps({"id": f"new{i}", "title": f"New {i}",
                                          "text": f"Fresh passage {i} about sequences and files. " * 20}) + "\n"
                              for i in range(40)))
    old = passage_ids(tiny_bundle)
    reference = Path(shutil.copytree(tiny_bundle, tmp_path / "reference"))
    t0 = time.monotonic()
    proc = index_add(reference, corpus)
    assert proc.wait() == 0, proc.stderr.read()
    duration = time.monotonic() - t0
    new = passage_ids(reference)
    assert len(new) > len(old) + 100 and old < new

    rng = random.Random(SEED)
    outcomes = Counter()
    for run in range(RUNS):
        bundle = Path(shutil.copytree(tiny_bundle, tmp_path / f"run{run}"))
        proc = index_add(bundle, corpus)
        # Spread over the whole run and past it: a run slowed by a busy machine still gets
        # kills after its swap, and some kills find it finished.
        time.sleep(rng.uniform(0, 1.3 * duration))
        proc.kill()
        proc.wait()
        assert main(["verify", str(bundle)]) == 0, f"run {run}: the bundle does not verify"
        ids = passage_ids(bundle)
        assert ids in (old, new), f"run {run}: {len(ids)} passages, neither the old {len(old)} nor the new {len(new)}"
        outcomes["new" if ids == new else "old"] += 1
        # Evidence that the kill landed while the new generation was being written or swapped in.
        staged = list((bundle / CORPUS_DIR).glob(".gen-*"))
        outcomes["mid-write"] += bool(staged or (ids == old and (bundle / CORPUS_DIR / "gen-000002").exists()))
        # Whatever the kill left behind must not block the next update.
        if ids == old:
            add_documents(bundle, corpus, threads=1)
        else:
            with pytest.raises(CorpusError, match="already in the bundle"):
                add_documents(bundle, corpus, threads=1)
        assert passage_ids(bundle) == new
        shutil.rmtree(bundle)
    assert outcomes["old"] and outcomes["new"], outcomes      # the kills landed before and after the swap
    with capsys.disabled():
        print(f"\nkill test: {RUNS} runs, {outcomes['old']} old, {outcomes['new']} new, "
              f"{outcomes['mid-write']} killed while writing the new generation; "
              f"an uninterrupted index add takes {duration:.2f} s")
