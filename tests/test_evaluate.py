import json

import pytest

from ragrt.errors import CorpusError
from ragrt.evaluate import QA, evaluate, exact_match, is_loop, is_relevant, read_qa, rouge_l, token_f1
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
    assert set(result.answer) == {"exact_match", "f1", "rouge_l", "grounded", "loop_rate", "loops"}
    assert result.latency_ms["p95"] >= result.latency_ms["p50"] > 0
    # The quote references, from the same passages: lead is the top passage's first word here
    # (the median reference has one word), extract its whole sentence, which holds "json".
    assert result.lead_words == 1
    assert set(result.references) == {"lead", "extract"}
    assert result.references["lead"]["f1"] == 0.0
    assert result.references["extract"]["f1"] > 0.0
    assert result.margin_f1 == result.answer["f1"] - result.references["extract"]["f1"]


def test_mode_extract_answers_what_the_extract_reference_says(tiny_bundle):
    from ragrt import Engine
    engine = Engine.open(tiny_bundle)
    items = [QA("How do I copy a list?", "Use list.copy() or a slice a[:] to copy a list.", ("lists",)),
             QA("What does the GIL do?", "The GIL lets one thread run Python bytecode at a time.", ("gil",))]
    result = evaluate(engine, items, mode="extract", k=2)
    assert result.answer["f1"] == result.references["extract"]["f1"] and result.margin_f1 <= 0
    assert result.answer["grounded"] == 1.0



@pytest.mark.parametrize("mode", ["concat", "token", "sequence"])
def test_evaluate_embeds_each_question_once_and_answers_as_ask(tiny_bundle, mode, monkeypatch):
    """One embedding per question, yet the generator gets ask's k passages and weights, not the depth-10 search;
    then one batch of them all for the recall of each retrieval."""
    from ragrt import Engine
    engine = Engine.open(tiny_bundle)
    questions = ["How do I copy a list?", "What is the GIL?", "How are files closed?"]
    asked = [engine.ask(q, k=2, mode=mode, max_new_tokens=12) for q in questions]
    items = [QA(q, a.answer, ("lists",)) for q, a in zip(questions, asked)]
    embedded = []
    embed_all = engine.encoder.embed_all
    monkeypatch.setattr(engine.encoder, "embed_all", lambda texts: embedded.append(list(texts)) or embed_all(texts))
    result = evaluate(engine, items, k=2, mode=mode, max_new_tokens=12)
    assert embedded == [[q] for q in questions] + [questions]
    assert result.answer["exact_match"] == 1.0
    ranks = [next(r for r, h in enumerate(engine.retrieve(q, k=5), start=1) if h.id.startswith("lists"))
             for q in questions]
    assert result.retrieval["mrr@10"] == pytest.approx(sum(1 / r for r in ranks) / len(ranks))


def test_evaluate_answers_as_ask_with_passage_kv(tiny_bundle):
    """Options reach the decoding: with passage KV on, eval's answers are ask's in block mode."""
    from ragrt import Engine
    engine = Engine.open(tiny_bundle)
    questions = ["How do I copy a list?", "What is the GIL?"]
    asked = [engine.ask(q, k=3, max_new_tokens=12, passage_kv="on").answer for q in questions]
    assert len(engine.passage_kv.cache) > 0
    fresh = Engine.open(tiny_bundle)
    result = evaluate(fresh, [QA(q, "", ()) for q in questions], k=3, max_new_tokens=12, passage_kv="on")
    assert result.predictions == asked and len(fresh.passage_kv.cache) == len(engine.passage_kv.cache)


def test_the_top_of_a_deeper_search_is_the_shallow_search(tiny_bundle):
    from ragrt import Engine
    from ragrt.evaluate import _top
    engine = Engine.open(tiny_bundle)
    deep, shallow = _top(engine.prepare("How do I copy a list?", k=5), 2), engine.prepare("How do I copy a list?", k=2)
    assert [(s.id, s.score) for s in deep.sources] == [(s.id, s.score) for s in shallow.sources]
    assert [s.prob for s in deep.sources] == pytest.approx([s.prob for s in shallow.sources], abs=1e-12)
    assert deep.prior == pytest.approx(shallow.prior, abs=1e-12) and deep.passages == shallow.passages


def test_evaluate_counts_the_answers_that_loop(tiny_bundle, monkeypatch):
    """is_loop sees each answer's text encoded again and whether it ran to max_new_tokens."""
    import ragrt.evaluate
    from ragrt import Engine
    engine = Engine.open(tiny_bundle)
    questions = ["How do I copy a list?", "What is the GIL?"]
    asked = [engine.ask(q, max_new_tokens=40) for q in questions]
    seen = []
    monkeypatch.setattr(ragrt.evaluate, "is_loop", lambda ids, hit_limit: seen.append((ids, hit_limit)) or len(seen) == 1)
    result = evaluate(engine, [QA(q, "x", ()) for q in questions], max_new_tokens=40)
    assert seen == [(engine.tokenizer.encode(a.answer, add_special_tokens=False).ids, a.finish_reason == "length")
                    for a in asked]
    assert result.answer["loops"] == 1 and result.answer["loop_rate"] == 0.5


def test_is_loop():
    prose = list(range(100))                                   # a long answer, no repetition
    assert not is_loop(prose, hit_limit=True)
    assert is_loop([7, 1, 2, 3, 4, 9, 1, 2, 3, 4, 8, 1, 2, 3, 4], hit_limit=False)    # a 4-gram thrice
    assert not is_loop([7, 1, 2, 3, 4, 9, 1, 2, 3, 4, 8], hit_limit=False)             # ... twice
    assert is_loop([5] * 6, hit_limit=False)                   # overlapping occurrences count
    assert not is_loop([5] * 5, hit_limit=False)
    assert is_loop(prose + [1, 2, 3, 4, 5] * 3, hit_limit=False)
    assert is_loop("the cat sat on the mat the cat sat on the mat the cat sat on".split(), hit_limit=False)


def test_a_repeated_3gram_is_not_a_loop():
    short = [7, 8, 9, 1, 7, 8, 9, 2, 7, 8, 9]                 # "for i in" three times
    assert not is_loop(short, hit_limit=False)
    assert not is_loop(short, hit_limit=True)
    assert not is_loop(list(range(50)) + [7, 8, 9, 100, 7, 8, 9, 101, 7, 8, 9, 102] * 2, hit_limit=True)


def test_a_periodic_tail_loops_only_at_the_token_limit():
    block = list(range(100, 116))                              # 16 tokens, twice: each 4-gram only twice
    answer = list(range(40)) + block + block
    assert is_loop(answer, hit_limit=True)
    assert not is_loop(answer, hit_limit=False)                # it ended by itself: EOS after the block
    longer = list(range(100, 117))                             # period 17 is over the limit of 16
    assert not is_loop(list(range(40)) + longer + longer, hit_limit=True)
    assert not is_loop(block + block[:15], hit_limit=True)     # 31 tokens: too short to judge the tail


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
