"""`Retriever`: question -> top-k passages, through memory-mapped USearch index shards."""
from __future__ import annotations

import math

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ragrt.retrieval.encoder import TextEncoder
from ragrt.errors import BundleError, UserInputError
from ragrt.runtime.madvise import advise_random
from ragrt.bundle.manifest import IndexSpec, PassagesSpec
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


@dataclass(frozen=True)
class Hit(Passage):
    """A retrieved passage: the passage itself, where the store holds it, and how well it matched."""
    row: int
    score: float                   # cosine similarity


class Retriever:
    def __init__(self, index: ShardedIndex, store: PassageStore, encoder: TextEncoder):
        self.index = index
        self.store = store
        self.encoder = encoder

    @classmethod
    def open(cls, root: Path, spec: IndexSpec, passages: PassagesSpec, encoder: TextEncoder, *,
             shards: tuple[IndexSpec, ...] = ()) -> "Retriever":
        """`root` is the directory the specs' paths are relative to: a corpus generation. `spec` is the
        index or its first shard, `shards` the others (GenerationSpec's fields)."""
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
        return cls(index, store, encoder)

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
        return [[self._hit(int(row), float(d)) for row, d in zip(r, ds) if row >= 0] for r, ds in zip(rows, distances)]

    def retrieve(self, query: str, k: int) -> list[Hit]:
        return self.search(self.encoder.embed_all([query]), k)[0]

    def _hit(self, row: int, distance: float) -> Hit:
        p = self.store.get(row)
        return Hit(p.id, p.title, p.text, row=row, score=1.0 - distance)   # usearch's cos distance is 1 - cosine
