"""`Retriever`: question -> top-k passages, through memory-mapped USearch index shards (dense), a BM25
index (retrieval/bm25.py), or both fused by reciprocal rank."""
from __future__ import annotations

import math

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ragrt.retrieval.encoder import TextEncoder
from ragrt.errors import BundleError, UserInputError
from ragrt.runtime.madvise import advise_random
from ragrt.bundle.manifest import Bm25Spec, IndexSpec, PassagesSpec
from ragrt.options import RETRIEVALS
from ragrt.retrieval.bm25 import Bm25Index, fuse
from ragrt.retrieval.index import open_index
from ragrt.retrieval.passages import Passage, PassageStore
from ragrt.retrieval.shards import ShardedIndex


def search_breadth(count: int, floor: int) -> int:
    """expansion_search for an index of `count` vectors: the manifest's value, widened for big indexes.

    HNSW keeps its recall only with a wider beam as the graph grows. On real-derived MiniLM
    vectors (benchmarks/retrieval.py) 128 gave recall@10 0.992 at 100k but 0.913 at 1M, where
    512 gave 0.976; this doubles from 128 at 256k vectors up to 512 at 1M.
    """
    return max(floor, min(512, 1 << max(0, math.ceil(math.log2(max(count, 1) / 2000)))))


# Each ranking's depth before fusion. Fixed (for k up to it), so the fused top 5 is the head of the
# fused top 10, as a dense top 5 is of a dense top 10: `ragrt eval` scores recall@10 and answers from the top k.
CANDIDATES = 50


@dataclass(frozen=True)
class Hit(Passage):
    """A retrieved passage: the passage itself, where the store holds it, and how well it matched."""
    row: int
    # Cosine similarity of passage and question, whichever retrieval found the passage: the passage
    # weights P(c|q) are a softmax of it. Its order is the retrieval's, not always the score's.
    score: float


class Retriever:
    def __init__(self, index: ShardedIndex, store: PassageStore, encoder: TextEncoder, bm25: Bm25Index | None = None):
        self.index = index
        self.store = store
        self.encoder = encoder
        self.bm25 = bm25

    @classmethod
    def open(cls, root: Path, spec: IndexSpec, passages: PassagesSpec, encoder: TextEncoder, *,
             shards: tuple[IndexSpec, ...] = (), bm25: Bm25Spec | None = None) -> "Retriever":
        """`root` is the directory the specs' paths are relative to: a corpus generation. `spec` is the
        index or its first shard, `shards` the others, `bm25` its BM25 index (GenerationSpec's fields)."""
        indexes = []
        for s in (spec, *shards):
            path = root / s.path
            index = open_index(path, s)
            index.expansion_search = search_breadth(len(index), s.expansion_search)
            advise_random(path)    # queries hop all over the file: readahead only evicts wanted pages
            indexes.append(index)
        index = ShardedIndex(indexes, spec.i8_scale if spec.dtype == "i8" else None)
        store = PassageStore.open(root, passages)
        if len(store) != len(index):
            raise BundleError(f"{root}: the index holds {len(index)} passages but the store {len(store)}")
        sparse = None if bm25 is None else Bm25Index.open(root, bm25)
        if sparse is not None and sparse.count != len(store):
            raise BundleError(f"{root}: the BM25 index holds {sparse.count} passages but the store {len(store)}")
        return cls(index, store, encoder, sparse)

    @property
    def retrievals(self) -> tuple[str, ...]:
        return RETRIEVALS if self.bm25 is not None else ("dense",)

    def check(self, retrieval: str) -> str:
        if retrieval not in RETRIEVALS:
            raise UserInputError(f"retrieval must be one of {', '.join(RETRIEVALS)}, got {retrieval!r}")
        if retrieval not in self.retrievals:
            raise UserInputError(f"retrieval {retrieval!r} needs a BM25 index, and this bundle has none (exported "
                                 "before ragrt kept one): re-export it with `ragrt export`, or use retrieval dense")
        return retrieval

    def find(self, query: str, vector: np.ndarray, k: int, retrieval: str) -> list[Hit]:
        """The top-k passages for one question by `retrieval`, best first: BM25 reads `query`, dense
        search and every hit's score its embedding `vector` (dim,). BM25 leaves out passages that share
        no word with the question, so it may find fewer than k."""
        self.check(retrieval)
        if retrieval == "dense":
            return self.search(vector[None], k)[0]
        k = min(k, len(self.store))
        depth = max(k, CANDIDATES) if retrieval == "hybrid" else k
        rows = self.bm25.search(query, depth)
        if retrieval == "hybrid":
            dense, _ = self.index.search(np.asarray(vector[None], dtype=np.float32), depth)
            rows = fuse([[int(row) for row in dense[0] if row >= 0], rows], k)
        return self._scored(rows, vector)

    def _scored(self, rows: list[int], vector: np.ndarray) -> list[Hit]:
        """Hits for `rows`, scored by the cosine of the question with their stored vectors (as dense hits are)."""
        if not rows:
            return []
        stored = self.index.get(rows)
        cosine = stored @ vector / np.maximum(np.linalg.norm(stored, axis=1), 1e-12)
        return [self._hit(row, float(c)) for row, c in zip(rows, cosine)]

    def search(self, query_vectors: np.ndarray, k: int) -> list[list[Hit]]:
        """Top-k passages for each row of `query_vectors` (n, dim), best first; k is clipped to the store size."""
        if not isinstance(k, (int, np.integer)) or k < 0:
            raise UserInputError(f"k must be a non-negative integer, got {k!r}")
        queries = np.asarray(query_vectors, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.index.ndim:
            raise UserInputError(f"query vectors must be (n, {self.index.ndim}), got {tuple(queries.shape)}")
        k = min(int(k), len(self.store))
        if k == 0 or len(queries) == 0:
            return [[] for _ in range(len(queries))]
        rows, distances = self.index.search(np.ascontiguousarray(queries), k)
        # usearch's cos distance is 1 - cosine
        return [[self._hit(int(row), 1.0 - float(d)) for row, d in zip(r, ds) if row >= 0] for r, ds in zip(rows, distances)]

    def retrieve(self, query: str, k: int, retrieval: str = "dense") -> list[Hit]:
        return self.find(query, self.encoder.embed_all([query])[0], k, retrieval)

    def _hit(self, row: int, score: float) -> Hit:
        p = self.store.get(row)
        return Hit(p.id, p.title, p.text, row=row, score=score)
