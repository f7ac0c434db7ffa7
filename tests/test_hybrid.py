"""Hybrid retrieval (issue 28, item 5): a BM25 index in each corpus generation, fused with dense search by
reciprocal rank, chosen per request on every surface, kept in step by `ragrt index add/remove`."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from ragrt import Engine
from ragrt.bundle.integrity import sha256_file
from ragrt.bundle.reader import Bundle
from ragrt.corpus.update import add_documents, remove_ids
from ragrt.errors import BundleError, UserInputError
from ragrt.evaluate import QA, evaluate
from ragrt.export.pipeline import NO_DEV_RETRIEVAL, retrieval_default
from ragrt.retrieval.bm25 import fuse
from ragrt.retrieval.retriever import CANDIDATES
from ragrt.serve.app import ServerConfig, create_app
from serving import running_server

ROOT = Path(__file__).resolve().parents[1]
# A word of each tiny corpus passage that no other passage holds.
KEYWORDS = {"loads": "json#0", "bytecode": "gil#0", "mutable": "lists#0", "lazily": "gen#0", "closed": "files#0"}
NO_BM25 = "needs a BM25 index, and this bundle has none"


def ragrt(*args):
    return subprocess.run([sys.executable, "-m", "ragrt", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def without_bm25(bundle: Path, out: Path) -> Path:
    """`bundle` as ragrt wrote it before BM25 indexes: no `bm25` in generation.json, no retrieval in the manifest."""
    shutil.copytree(bundle, out)
    manifest = out / "manifest.json"
    m = json.loads(manifest.read_text())
    del m["rag"]["retrieval"], m["rag"]["retrieval_reason"]
    manifest.write_text(json.dumps(m, indent=2, sort_keys=True) + "\n")
    pointer = out / "corpus" / "CURRENT"
    gen = out / "corpus" / pointer.read_text().split()[0]
    g = json.loads((gen / "generation.json").read_text())
    del g["bm25"]
    g["files"] = {rel: e for rel, e in g["files"].items() if not rel.startswith("bm25/")}
    g["manifest_sha256"] = sha256_file(manifest)
    shutil.rmtree(gen / "bm25")
    (gen / "generation.json").write_text(json.dumps(g, indent=2, sort_keys=True) + "\n")
    pointer.write_text(f"{gen.name} {sha256_file(gen / 'generation.json')}\n")
    return out


@pytest.fixture(scope="module")
def engine(tiny_bundle):
    return Engine.open(tiny_bundle, threads=1)


@pytest.fixture(scope="module")
def old_bundle(tiny_bundle, tmp_path_factory):
    return without_bm25(tiny_bundle, tmp_path_factory.mktemp("old") / "b")


def test_bm25_finds_the_passage_holding_a_word_where_dense_does_not(engine):
    bm25 = {word: [h.id for h in engine.retrieve(f"what about {word}?", k=1, retrieval="bm25")] for word in KEYWORDS}
    assert bm25 == {word: [pid] for word, pid in KEYWORDS.items()}
    # The tiny encoder's weights are random: its embeddings know no words.
    dense = {word: engine.retrieve(f"what about {word}?", k=1, retrieval="dense")[0].id for word in KEYWORDS}
    assert any(dense[word] != pid for word, pid in KEYWORDS.items()), dense
    assert engine.retrieve("what about quux?", k=3, retrieval="bm25") == []     # no passage shares a word
    with pytest.raises(UserInputError, match="no passage shares a word with the question"):
        engine.ask("what about quux?", retrieval="bm25", max_new_tokens=2)


def test_reciprocal_rank_fusion():
    assert fuse([[5, 6], [6, 7]], 3) == [6, 5, 7]
    assert fuse([[1, 2, 3], [3, 4, 1]], 4) == [1, 3, 2, 4]      # ties: first seen first
    assert fuse([[1], [2, 3]], 2) == [1, 2] and fuse([[]], 5) == []
    # Second in both beats first in one, however deep the lists: 2 / (RRF_K + 2) > 1 / (RRF_K + 1).
    assert fuse([[9, 8], [7, 8]], 1) == [8]


def test_hybrid_is_the_fusion_of_dense_and_bm25_scored_by_cosine(engine):
    question = "How do I copy a mutable list?"
    dense = engine.retrieve(question, k=CANDIDATES, retrieval="dense")
    bm25 = engine.retrieve(question, k=CANDIDATES, retrieval="bm25")
    hybrid = engine.retrieve(question, k=3, retrieval="hybrid")
    expected = fuse([[h.row for h in dense], [h.row for h in bm25]], 3)
    assert [h.row for h in hybrid] == expected and len(hybrid) == 3
    cosine = {h.id: h.score for h in dense}                     # the tiny corpus is smaller than CANDIDATES
    np.testing.assert_allclose([h.score for h in hybrid], [cosine[h.id] for h in hybrid], atol=2e-3)
    assert [h.id for h in engine.retrieve(question, k=5, retrieval="hybrid")[:3]] == [h.id for h in hybrid]
    answer = engine.ask(question, retrieval="hybrid", max_new_tokens=2)
    assert [s.id for s in answer.sources] == [h.id for h in engine.retrieve(question, k=5, retrieval="hybrid")]


def test_the_export_writes_a_checked_bm25_index_and_dense_by_default(tiny_bundle):
    bundle = Bundle.open(tiny_bundle, verify=True)
    spec = bundle.generation.spec.bm25
    assert spec.count == bundle.generation.spec.passages.count and spec.tokenizer == "bm25s-en-1"
    assert all(rel in bundle.generation.spec.files for rel in spec.paths)
    rag = bundle.manifest.rag
    assert (rag.retrieval, rag.retrieval_reason) == ("dense", NO_DEV_RETRIEVAL)


def test_a_damaged_bm25_file_fails_verify_and_open(tiny_bundle, tmp_path):
    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "b"))
    gen = Bundle.open(bundle).generation
    vocab = gen.file("bm25/vocab.index.json")
    vocab.write_text(vocab.read_text().replace('"loads"', '"louds"'))          # same size
    out = ragrt("verify", bundle)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "vocab.index.json" in out.stderr, out.stderr
    with pytest.raises(BundleError, match=r"vocab\.index\.json: sha256"):
        Engine.open(bundle, threads=1)
    (gen.file("bm25/data.csc.index.npy")).unlink()
    with pytest.raises(BundleError, match=r"data\.csc\.index\.npy"):
        Bundle.open(bundle)


def test_the_dev_set_chooses_the_default_retrieval():
    assert retrieval_default({"dense": 0.70, "bm25": 0.72, "hybrid": 0.74}) == (
        "hybrid", "dev recall@5 dense 0.700, bm25 0.720, hybrid 0.740: hybrid")
    choice, reason = retrieval_default({"dense": 0.70, "bm25": 0.72, "hybrid": 0.72})
    assert choice == "dense" and reason.endswith("dense, as nothing else is 3 points above it")
    assert retrieval_default({"dense": 0.5, "bm25": 0.6, "hybrid": 0.55})[0] == "bm25"
    assert retrieval_default({"dense": 0.5})[0] == "dense"


def test_index_add_and_remove_keep_bm25_in_step(tiny_bundle, tmp_path):
    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "b"))
    new = tmp_path / "new.jsonl"
    new.write_text(json.dumps({"id": "walrus", "title": "Walrus", "text": "The walrus operator := assigns."}) + "\n")
    engine = Engine.open(bundle, threads=1)
    assert engine.retrieve("walrus operator", k=3, retrieval="bm25") == []
    add_documents(bundle, new, threads=1)
    assert [h.id for h in engine.retrieve("walrus operator", k=3, retrieval="bm25")] == ["walrus#0"]
    assert "walrus#0" in [h.id for h in engine.retrieve("walrus operator", k=6, retrieval="hybrid")]
    ids = tmp_path / "ids.txt"
    ids.write_text("walrus\njson\n")
    remove_ids(bundle, ids)
    assert engine.retrieve("walrus operator", k=3, retrieval="bm25") == []
    assert engine.retrieve("json.loads", k=3, retrieval="bm25") == []
    assert [h.id for h in engine.retrieve("bytecode", k=1, retrieval="bm25")] == ["gil#0"]
    gen = Bundle.open(bundle, verify=True).generation
    assert gen.spec.bm25.count == gen.spec.passages.count == 4


def test_an_old_bundle_answers_densely_and_refuses_bm25(old_bundle, tmp_path):
    engine = Engine.open(old_bundle, threads=1)
    assert engine.manifest.rag.retrieval == "dense" and engine.retriever.retrievals == ("dense",)
    assert engine.ask("How do I copy a list?", max_new_tokens=2).sources
    for retrieval in ("bm25", "hybrid"):
        with pytest.raises(UserInputError, match=NO_BM25):
            engine.ask("How do I copy a list?", retrieval=retrieval, max_new_tokens=2)
    out = ragrt("ask", "--bundle", old_bundle, "--retrieval", "bm25", "--max-new-tokens", "2", "q")
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "ragrt: error: retrieval 'bm25' needs a BM25 index, and this bundle has none (exported before ragrt kept "
        "one): re-export it with `ragrt export`, or use retrieval dense"]
    assert "no BM25 index" in ragrt("info", old_bundle).stdout
    # An update gives it one.
    new = tmp_path / "new.jsonl"
    new.write_text(json.dumps({"id": "walrus", "title": "Walrus", "text": "The walrus operator := assigns."}) + "\n")
    copy = Path(shutil.copytree(old_bundle, tmp_path / "b"))
    add_documents(copy, new, threads=1)
    assert [h.id for h in Engine.open(copy, threads=1).retrieve("walrus", k=1, retrieval="bm25")] == ["walrus#0"]


def test_cli_ask_eval_and_info(tiny_bundle, tmp_path):
    out = ragrt("ask", "--bundle", tiny_bundle, "--retrieval", "fuzzy", "q")
    assert out.returncode == 2 and "argument --retrieval: invalid choice: 'fuzzy'" in out.stderr.strip().splitlines()[-1]
    out = ragrt("ask", "--bundle", tiny_bundle, "--retrieval", "bm25", "--json", "--max-new-tokens", "2", "json.loads")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["sources"][0]["id"] == "json#0"
    assert "retrieval   default dense (no --dev set: dense); BM25 index of the passages too" in ragrt(
        "info", tiny_bundle).stdout
    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"question": "json.loads", "answer": "parses JSON", "positive_ids": ["json"]}\n')
    out = ragrt("eval", "--bundle", tiny_bundle, "--qa", qa, "--retrieval", "bm25", "--max-new-tokens", "2",
                "--json", tmp_path / "e.json")
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "e.json").read_text())
    assert set(result["retrieval_by_method"]) == {"dense", "bm25", "hybrid"}
    assert result["retrieval"] == result["retrieval_by_method"]["bm25"] and result["retrieval"]["recall@1"] == 1.0
    assert "retrieval bm25" in out.stdout and "    hybrid   recall@1" in out.stdout


def test_eval_scores_each_retrieval_the_bundle_offers(engine, old_bundle):
    items = [QA(f"what about {word}?", "", (pid.split("#")[0],)) for word, pid in KEYWORDS.items()]
    result = evaluate(engine, items, max_new_tokens=1)
    assert result.retrieval_by_method["bm25"]["recall@1"] == 1.0
    assert result.retrieval == result.retrieval_by_method["dense"]          # the bundle's default
    old = evaluate(Engine.open(old_bundle, threads=1), items, max_new_tokens=1)
    assert list(old.retrieval_by_method) == ["dense"]


def test_http_retrieval_on_every_route(tiny_bundle, old_bundle, engine):
    with running_server(create_app(ServerConfig(bundle=str(tiny_bundle), threads=1))) as base:
        r = httpx.post(f"{base}/v1/retrieve", json={"query": "json.loads", "k": 2, "retrieval": "bm25"}, timeout=60)
        assert [p["id"] for p in r.json()["passages"]] == [h.id for h in engine.retrieve("json.loads", k=2,
                                                                                         retrieval="bm25")]
        r = httpx.post(f"{base}/v1/ask", json={"question": "json.loads", "retrieval": "hybrid", "max_new_tokens": 2},
                       timeout=60)
        assert [s["id"] for s in r.json()["sources"]] == [h.id for h in engine.retrieve("json.loads",
                                                                                        retrieval="hybrid")]
        r = httpx.post(f"{base}/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "json.loads"}], "retrieval": "bm25", "max_tokens": 2,
            "stream": True})
        last = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")][-1]
        assert [s["id"] for s in last["sources"]] == ["json#0"]
        for path, body in [("/v1/ask", {"question": "q", "retrieval": "fuzzy"}),
                           ("/v1/retrieve", {"query": "q", "retrieval": "sparse"}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "q"}], "retrieval": 1})]:
            r = httpx.post(f"{base}{path}", json=body, timeout=60)
            assert r.status_code == 422 and r.json()["error"]["message"], r.text
    with running_server(create_app(ServerConfig(bundle=str(old_bundle), threads=1))) as base:
        r = httpx.post(f"{base}/v1/ask", json={"question": "q", "retrieval": "bm25"}, timeout=60)
        assert r.status_code == 422 and NO_BM25 in r.json()["error"]["message"]
        r = httpx.post(f"{base}/v1/retrieve", json={"query": "q"}, timeout=60)
        assert r.status_code == 200 and r.json()["passages"]


def test_an_export_with_dev_records_each_retrievals_recall(tiny_corpus, tiny_encoder_dir, tiny_generator_dir, tmp_path):
    from ragrt.export.pipeline import ExportConfig, run_export
    dev = tmp_path / "dev.jsonl"
    dev.write_text("".join(json.dumps({"question": f"what about {word}?", "answer": "x", "positive_ids": [pid]}) + "\n"
                           for word, pid in KEYWORDS.items()))
    out = run_export(ExportConfig(corpus=tiny_corpus, out=tmp_path / "b", encoder=tiny_encoder_dir,
                                  generator=tiny_generator_dir, quantize="fp32", parity_prompts=2, max_context=512,
                                  dev=dev))
    rag = Bundle.open(out, verify=True).manifest.rag
    # Five passages: every retrieval has them all in its top 5.
    assert (rag.retrieval, rag.retrieval_reason) == (
        "dense", "dev recall@5 dense 1.000, bm25 1.000, hybrid 1.000: dense, as nothing else is 3 points above it")
    assert Bundle.open(out).generation.spec.bm25 is not None      # resealed with the decisions, index kept
