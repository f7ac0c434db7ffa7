"""BM25 over a corpus generation's passages, the sparse half of hybrid retrieval, and the fusion of rankings.

bm25s (NumPy sparse matrices; pyserini needs Java, rank-bm25 has no save format) writes its index as
.npy arrays that `load(mmap=True)` memory-maps, plus a JSON vocabulary read into memory. Document i
is row i of the passage store. bm25s cannot add or remove documents, so `ragrt index add/remove`
build the index again from the new generation's passages (2 s for 4,065 passages, 10 s for
29,182, on 2 busy cores).
bm25s keeps no tokenizer with its index: queries are cut into words by `words`, as the passages
were, and `TOKENIZER` names that way in the generation so that a changed one is refused, not
silently mismatched.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ragrt.bundle.manifest import Bm25Spec
from ragrt.errors import BundleError
from ragrt.retrieval.passages import Passage, passage_text

DIR = "bm25"
TOKENIZER = "bm25s-en-1"           # lower-cased runs of 2+ word characters, English stop words dropped, no stemming
RRF_K = 60                         # reciprocal rank fusion: 1 / (RRF_K + rank), as Cormack et al. (2009)


def _bm25s():
    import bm25s
    logging.getLogger("bm25s").setLevel(logging.WARNING)    # set to DEBUG by bm25s, which logs every build
    return bm25s


def words(texts: list[str]) -> list[list[str]]:
    return _bm25s().tokenize(texts, lower=True, stopwords="en", return_ids=False, show_progress=False)


def write_bm25(root: Path, passages: Iterable[Passage]) -> Bm25Spec:
    """The BM25 index of `passages` (in row order), written under `root`/bm25."""
    tokens = words([passage_text(p) for p in passages])
    model = _bm25s().BM25()
    model.index(tokens, show_progress=False)
    model.save(root / DIR, show_progress=False)
    files = tuple(sorted(p.name for p in (root / DIR).iterdir()))
    return Bm25Spec(path=DIR, files=files, count=len(tokens), tokenizer=TOKENIZER)


class Bm25Index:
    def __init__(self, model, count: int):
        self.model = model
        self.count = count

    @classmethod
    def build(cls, texts: list[str]) -> "Bm25Index":
        """An index of `texts` in memory, row i for text i (fine-tuning mines lexical negatives with it)."""
        model = _bm25s().BM25()
        model.index(words(texts), show_progress=False)
        return cls(model, len(texts))

    @classmethod
    def open(cls, root: Path, spec: Bm25Spec) -> "Bm25Index":
        """Memory-maps the index of generation directory `root`; its files were checksummed by the opener."""
        if spec.tokenizer != TOKENIZER:
            raise BundleError(f"{root / spec.path}: BM25 words cut by {spec.tokenizer!r}, this ragrt cuts them by "
                              f"{TOKENIZER!r}; re-export the bundle")
        try:
            model = _bm25s().BM25.load(root / spec.path, mmap=True)
        except (OSError, ValueError) as e:
            raise BundleError(f"{root / spec.path}: not a readable BM25 index ({e})") from None
        if model.scores["num_docs"] != spec.count:
            raise BundleError(f"{root / spec.path}: BM25 index of {model.scores['num_docs']} passages, "
                              f"generation.json says {spec.count}")
        return cls(model, spec.count)

    def search(self, query: str, k: int) -> list[int]:
        """The rows of the top-k passages, best first; only passages that share a word with `query`."""
        ids = self.model.get_tokens_ids(words([query])[0])
        if not ids or k <= 0:
            return []
        scores = self.model.get_scores_from_ids(ids)
        top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
        top = top[np.lexsort((top, -scores[top]))]              # equal scores: the lower row first
        return [int(row) for row in top if scores[row] > 0]


def fuse(rankings: Sequence[Sequence[int]], k: int) -> list[int]:
    """Reciprocal rank fusion: rows by the sum of 1 / (RRF_K + rank) over the rankings they appear in,
    rank counted from 1; ties go to the row ranked first by the earlier ranking."""
    score: dict[int, float] = {}
    for ranking in rankings:
        for rank, row in enumerate(ranking, start=1):
            score[row] = score.get(row, 0.0) + 1.0 / (RRF_K + rank)
    return sorted(score, key=lambda row: -score[row])[:k]       # stable: dict order is first appearance
