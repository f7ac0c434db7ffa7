"""`ragrt eval`: retrieval and answer quality of a bundle on a Q/A set, plus latency.

Retrieval is scored at depth 10 against `positive_ids`; a positive names a passage
(`doc#3`) or a whole document (`doc`), whose every passage then counts. It is scored for the
retrieval the answers used and, without answering, for each retrieval the bundle offers. Answers are
scored against `answer` with SQuAD's normalisation (exact match, token F1) and ROUGE-L,
and checked for loops (`is_loop`). Beside them, two answers made without the generator from the
same passages are scored the same way, as the reference a generator must beat: `lead` (the top
passage's first words) and `extract` (mode extract). docs/eval.md defines every figure. The metrics are the
standard formulas in a few lines each, so the runtime needs no `evaluate` or `rouge-score`.
"""
from __future__ import annotations

import re
import statistics
import string
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Hashable, Sequence

import numpy as np

from ragrt.corpus.jsonl import iter_jsonl
from ragrt.errors import CorpusError
from ragrt.extract import extract, lead
from ragrt.retrieval.passages import document_of

if TYPE_CHECKING:
    from ragrt.engine import Engine, Prepared

DEPTH = 10
_PUNCT = set(string.punctuation)
# An n-gram of n >= 4 seen 3 times contains a 4-gram seen 3 times, so counting 4-grams covers every n.
LOOP_NGRAM = 4
LOOP_REPEATS = 3
LOOP_TAIL = 32
LOOP_MAX_PERIOD = 16


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    positive_ids: tuple[str, ...]
    passage: str | None = None      # the passage a synthetic question was written from (ragrt data synth)


def read_qa(path: str | Path) -> list[QA]:
    items = []
    for where, obj in iter_jsonl(Path(path)):
        q, a, pos, source = obj.get("question"), obj.get("answer", ""), obj.get("positive_ids", []), obj.get("passage")
        if not isinstance(q, str) or not q.strip():
            raise CorpusError(f"{where}: \"question\" must be a non-empty string")
        if not isinstance(a, str):
            raise CorpusError(f"{where}: \"answer\" must be a string")
        if not isinstance(pos, list) or not all(isinstance(p, str) for p in pos):
            raise CorpusError(f"{where}: \"positive_ids\" must be a list of strings")
        if source is not None and not isinstance(source, str):
            raise CorpusError(f"{where}: \"passage\" must be a passage id (a string)")
        items.append(QA(q, a, tuple(pos), source))
    if not items:
        raise CorpusError(f"{path}: no questions")
    return items


def normalize(text: str) -> str:
    """SQuAD: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, reference: str) -> float:
    """F-measure of the longest common subsequence of normalised tokens."""
    a, b = normalize(prediction).split(), normalize(reference).split()
    if not a or not b:
        return float(a == b)
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


def is_loop(ids: Sequence[Hashable], hit_limit: bool) -> bool:
    """Whether an answer is stuck repeating itself: some 4-gram occurs 3 or more times (overlaps
    count), or the answer hit its token limit while its last 32 tokens have a period p <= 16
    (tail[i] == tail[i + p] throughout). docs/eval.md gives the reasons for each number."""
    grams = Counter(tuple(ids[i:i + LOOP_NGRAM]) for i in range(len(ids) - LOOP_NGRAM + 1))
    if grams and max(grams.values()) >= LOOP_REPEATS:
        return True
    tail = list(ids[-LOOP_TAIL:])
    return hit_limit and len(tail) == LOOP_TAIL and any(
        all(tail[i] == tail[i + p] for i in range(LOOP_TAIL - p)) for p in range(1, LOOP_MAX_PERIOD + 1))


def is_relevant(passage_id: str, positives: tuple[str, ...]) -> bool:
    return passage_id in positives or document_of(passage_id) in positives


REFERENCES = ("lead", "extract")


@dataclass(frozen=True)
class EvalResult:
    n: int
    retrieval: dict[str, float]
    answer: dict[str, float]       # exact_match, f1, rouge_l, grounded, loop_rate (shares), loops (a count)
    latency_ms: dict[str, float]
    predictions: list[str]         # the generated answers, in the order of the items
    references: dict[str, dict[str, float]]   # "lead", "extract": exact_match, f1, rouge_l
    lead_words: int                # the lead reference's length: the median reference answer's, in words
    retrieval_by_method: dict[str, dict[str, float]]   # `retrieval`'s figures for each retrieval the bundle offers

    @property
    def margin_f1(self) -> float:
        """The answers' F1 over the better of the two quote references (negative: a quote does better)."""
        return self.answer["f1"] - max(r["f1"] for r in self.references.values())

    def to_dict(self) -> dict:
        return {"n": self.n, "retrieval": self.retrieval, "answer": self.answer, "references": self.references,
                "lead_words": self.lead_words, "margin_f1": self.margin_f1, "latency_ms": self.latency_ms,
                "predictions": self.predictions, "retrieval_by_method": self.retrieval_by_method}


def _scores(predictions: list[str], items: list[QA]) -> dict[str, float]:
    return {name: float(np.mean([fn(p, qa.answer) for p, qa in zip(predictions, items)]))
            for name, fn in (("exact_match", exact_match), ("f1", token_f1), ("rouge_l", rouge_l))}


def evaluate(engine: Engine, items: list[QA], *, progress: Callable[[int, int], None] | None = None,
             **options) -> EvalResult:
    """Scores `engine` on `items`; `options` are `Engine.ask`'s (k, mode, max_new_tokens, ...).

    Each question is embedded and searched once, at depth max(k, 10): the top 10 score
    retrieval and the top k go to the generator, as `ask` would give them.
    """
    k = options.pop("k", None)
    k = engine.manifest.rag.k if k is None else k
    # An invalid k goes through unchanged, so that `prepare` rejects it with its own message.
    depth = max(k, DEPTH) if type(k) is int and k >= 1 else k
    lead_words = max(1, round(statistics.median(len(qa.answer.split()) for qa in items)))
    ranks: list[int | None] = []
    loops, grounded, latency, predictions = [], [], [], []
    quoted: dict[str, list[str]] = {name: [] for name in REFERENCES}
    for i, qa in enumerate(items):
        t0 = time.perf_counter()
        fetched = engine.prepare(qa.question, k=depth, **options)
        ranks.append(_rank([s.id for s in fetched.sources], qa))
        p = _top(fetched, k)
        stream = engine.answer_stream(p)
        for _ in stream:
            pass
        ans = stream.answer
        latency.append((time.perf_counter() - t0) * 1e3)
        predictions.append(ans.answer)
        grounded.append(ans.grounded)
        quoted["lead"].append(lead(p.passages, lead_words))
        quoted["extract"].append(extract(p.question, p.passages, p.prior, engine.manifest.rag.extract))
        ids = engine.tokenizer.encode(ans.answer, add_special_tokens=False).ids
        loops.append(is_loop(ids, hit_limit=ans.finish_reason == "length"))
        if progress:
            progress(i + 1, len(items))
    return EvalResult(
        n=len(items),
        retrieval=_recall(ranks, items),
        answer={**_scores(predictions, items), "grounded": float(np.mean(grounded)),
                "loop_rate": float(np.mean(loops)), "loops": int(sum(loops))},
        latency_ms={"p50": float(np.percentile(latency, 50)), "p95": float(np.percentile(latency, 95))},
        predictions=predictions,
        references={name: _scores(answers, items) for name, answers in quoted.items()},
        lead_words=lead_words,
        retrieval_by_method=retrieval_recall(engine, items),
    )


def retrieval_recall(engine: Engine, items: list[QA]) -> dict[str, dict[str, float]]:
    """`EvalResult.retrieval` for each retrieval the bundle offers ("dense", "bm25", "hybrid"), from its
    top 10 alone, without answering; the questions are embedded once, in batches."""
    retriever = engine.retriever
    vectors = engine.encoder.embed_all([qa.question for qa in items])
    return {r: _recall([_rank([h.id for h in retriever.find(qa.question, v, DEPTH, r)], qa)
                        for qa, v in zip(items, vectors)], items) for r in retriever.retrievals}


def _rank(ids: list[str], qa: QA) -> int | None:
    """The rank (from 1) of the first relevant passage among the top DEPTH `ids`, or None."""
    return next((r for r, i in enumerate(ids[:DEPTH], start=1) if is_relevant(i, qa.positive_ids)), None)


def _recall(ranks: list[int | None], items: list[QA]) -> dict[str, float]:
    judged = [r for r, qa in zip(ranks, items) if qa.positive_ids] or [None]

    def recall(at: int) -> float:
        return float(np.mean([r is not None and r <= at for r in judged]))

    return {"recall@1": recall(1), "recall@5": recall(5), "recall@10": recall(10),
            "mrr@10": float(np.mean([1.0 / r if r else 0.0 for r in judged]))}


def _top(prepared: Prepared, k: int) -> Prepared:
    """The request as `prepare(k=k)` makes it: the first k passages, P(c|q) renormalised over them
    (a softmax over fewer scores is the longer one's head divided by its sum)."""
    prior = prepared.prior[:k] / prepared.prior[:k].sum()
    sources = [replace(s, prob=float(pr)) for s, pr in zip(prepared.sources[:k], prior)]
    return replace(prepared, passages=prepared.passages[:k], prior=prior, sources=sources)
