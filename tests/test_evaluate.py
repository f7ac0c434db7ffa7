import json

import pytest

from ragrt.errors import CorpusError
from ragrt.evaluate import QA, evaluate, exact_match, is_relevant, read_qa, rouge_l, token_f1
from ragrt.export.data.faq import faq_items, split_of, write_python_faq


def test_squad_metrics():
    assert exact_match("The Cat!", "cat") == 1.0
    assert exact_match("a dog", "cat") == 0.0
    assert token_f1("the quick brown fox", "quick fox jumps") == pytest.approx(2 * (2 / 3) * (2 / 3) / (4 / 3))
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0
    assert rouge_l("x b c d", "x c d e") == pytest.approx(0.75)     # LCS "x c d": 3 of 4 each way
    assert rouge_l("a b c d", "a c d e") == pytest.approx(2 / 3)    # "a" is an article: SQuAD drops it
    assert rouge_l("x y", "z") == 0.0


def test_relevance_by_passage_or_document():
    assert is_relevant("faq/x#q#2", ("faq/x#q",))
    assert is_relevant("faq/x#q#2", ("faq/x#q#2",))
    assert not is_relevant("faq/x#q#2", ("faq/x#q#1",))
    assert not is_relevant("faq/x#qq#0", ("faq/x#q",))


def test_read_qa_errors(tmp_path):
    p = tmp_path / "qa.jsonl"
    p.write_text('{"question": "q", "answer": "a", "positive_ids": ["d"]}\n{"question": ""}\n')
    with pytest.raises(CorpusError, match="qa.jsonl:2: \"question\" must be"):
        read_qa(p)
    p.write_text('{"question": "q", "positive_ids": "d"}\n')
    with pytest.raises(CorpusError, match="qa.jsonl:1: \"positive_ids\" must be a list"):
        read_qa(p)
    p.write_text("\n")
    with pytest.raises(CorpusError, match="no questions"):
        read_qa(p)


def test_evaluate_on_the_tiny_bundle(tiny_bundle):
    from ragrt import Engine
    engine = Engine.open(tiny_bundle)
    items = [QA("The json module parses JSON documents with json.loads and json.load.", "json", ("json",)),
             QA("Generators yield values lazily, one at a time, when iterated.", "lazily", ("gen#0",)),
             QA("something", "x", ("not-in-corpus",))]
    result = evaluate(engine, items, max_new_tokens=4)
    assert result.n == 3
    # Exact copies of passages are found first; the third question has no relevant passage.
    assert result.retrieval["recall@1"] == pytest.approx(2 / 3)
    assert result.retrieval["recall@10"] == pytest.approx(2 / 3)
    assert result.retrieval["mrr@10"] == pytest.approx(2 / 3)
    assert set(result.answer) == {"exact_match", "f1", "rouge_l"}
    assert result.latency_ms["p95"] >= result.latency_ms["p50"] > 0


FAQ = """\
===============
Programming FAQ
===============

General Questions
=================

How do I copy an object?
------------------------

Use copy.copy() for a shallow copy and copy.deepcopy() for a deep one.

Second paragraph.

Why is the sky blue?
--------------------

Because of Rayleigh scattering of sunlight in the atmosphere.
"""


def test_python_faq_dataset(tmp_path):
    src = tmp_path / "_sources"
    (src / "faq").mkdir(parents=True)
    (src / "faq" / "programming.rst.txt").write_text(FAQ)
    (src / "library").mkdir()
    (src / "library" / "copy.rst.txt").write_text("copy\n====\n\nShallow and deep copy operations for objects.\n")
    items = faq_items(src)
    assert [i.question for i in items] == ["How do I copy an object?", "Why is the sky blue?"]
    assert items[0].title == "Programming FAQ — General Questions"
    assert items[0].answer.startswith("Use copy.copy() for a shallow copy")
    out = tmp_path / "faq"
    counts = write_python_faq(out, src)
    assert counts["corpus"] == 3 and sum(counts[s] for s in ("train", "dev", "test")) == 2
    corpus = [json.loads(line) for line in (out / "corpus.jsonl").read_text().splitlines()]
    for doc in corpus:
        assert "?" not in doc["title"], "a title must not repeat its question"
    rows = [json.loads(line) for s in ("train", "dev", "test") for line in (out / f"{s}.jsonl").read_text().splitlines()]
    assert {r["positive_ids"][0] for r in rows} <= {d["id"] for d in corpus}
    assert split_of("How do I copy an object?") == split_of("How do I copy an object?")
