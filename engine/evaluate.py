"""`ragrt eval`: retrieval and answer quality of a bundle on a Q/A set, plus latency.

Retrieval is scored at depth 10 against `positive_ids`; a positive names a passage
(`doc#3`) or a whole document (`doc`), whose every passage then counts. Answers are
scored against `answer` with SQuAD's normalisation (exact match, token F1) and ROUGE-L.
"""
from __future__ import annotations

import re
import string
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ragrt.errors import CorpusError
from ragrt.corpus.jsonl import iter_jsonl

DEPTH = 10
_PUNCT = set(string.punctuation)


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    positive_ids: tuple[str, ...]


def read_qa(path: str | Path) -> list[QA]:
    items = []
    for where, obj in iter_jsonl(Path(path)):
        q, a, pos = obj.get("question"), obj.get("answer", ""), obj.get("positive_ids", [])
        if not isinstance(q, str) or not q.strip():
            raise CorpusError(f"{where}: \"question\" must be a non-empty string")
        if not isinstance(a, str):
            raise CorpusError(f"{where}: \"answer\" must be a string")
        if not isinstance(pos, list) or not all(isinstance(p, str) for p in pos):
            raise CorpusError(f"{where}: \"positive_ids\" must be a list of strings")
        items.append(QA(q, a, tuple(pos)))
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


def is_relevant(passage_id: str, positives: tuple[str, ...]) -> bool:
    return passage_id in positives or passage_id.rsplit("#", 1)[0] in positives


@dataclass(frozen=True)
class EvalResult:
    n: int
    retrieval: dict[str, float]
    answer: dict[str, float]
    latency_ms: dict[str, float]

    def to_dict(self) -> dict:
        return {"n": self.n, "retrieval": self.retrieval, "answer": self.answer, "latency_ms": self.latency_ms}


def evaluate(engine, items: list[QA], *, mode: str | None = None, k: int | None = None,
             max_new_tokens: int | None = None, progress: Callable[[int, int], None] | None = None) -> EvalResult:
    ranks: list[int | None] = []
    em, f1, rl, latency = [], [], [], []
    for i, qa in enumerate(items):
        hits = engine.retrieve(qa.question, k=DEPTH)
        ranks.append(next((r for r, h in enumerate(hits, start=1) if is_relevant(h.id, qa.positive_ids)), None))
        t0 = time.perf_counter()
        ans = engine.ask(qa.question, mode=mode, k=k, max_new_tokens=max_new_tokens)
        latency.append((time.perf_counter() - t0) * 1e3)
        em.append(exact_match(ans.answer, qa.answer))
        f1.append(token_f1(ans.answer, qa.answer))
        rl.append(rouge_l(ans.answer, qa.answer))
        if progress:
            progress(i + 1, len(items))
    judged = [r for r, qa in zip(ranks, items) if qa.positive_ids] or [None]

    def recall(at: int) -> float:
        return float(np.mean([r is not None and r <= at for r in judged]))

    return EvalResult(
        n=len(items),
        retrieval={"recall@1": recall(1), "recall@5": recall(5), "recall@10": recall(10),
                   "mrr@10": float(np.mean([1.0 / r if r else 0.0 for r in judged]))},
        answer={"exact_match": float(np.mean(em)), "f1": float(np.mean(f1)), "rouge_l": float(np.mean(rl))},
        latency_ms={"p50": float(np.percentile(latency, 50)), "p95": float(np.percentile(latency, 95))},
    )
