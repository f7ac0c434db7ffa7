"""Index shards: a generation's vectors split over several USearch indexes, searched as one.

Shard j holds a contiguous range of passage rows, the ones after those of the shards before it,
under keys counted from 0 in each shard (row = the shard's first row + key). Contiguous ranges
with shard-local keys let an update rewrite only the shards it changes:
- `ragrt index add` puts all the new passages in one shard, the smallest (the last of equals, so a
  bundle just exported grows at its end), their rows inserted after that shard's in the passage
  store; the shards after it start at a higher row, with the same keys and so the same files.
- `ragrt index remove` rebuilds the shards that lose rows; again the others keep their files.
Rows dealt out as row % S would spread 1,000 added passages over every shard, and keys equal to
global rows would change in every shard after the first removed row. With one shard, key = row.

`ShardedIndex` searches the shards in parallel threads (usearch releases the GIL while it searches)
and merges their top-k by distance. usearch's own `Indexes` merges by key, and keys here repeat
across shards, so the merge is here.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import PurePosixPath
from typing import Sequence

import numpy as np

from ragrt.errors import BundleError
from ragrt.retrieval.index import to_int8


def shard_sizes(count: int, shards: int) -> list[int]:
    """How export splits `count` rows into `shards` contiguous ranges: sizes differ by at most one."""
    base, extra = divmod(count, shards)
    return [base + (j < extra) for j in range(shards)]


def receiving_shard(counts: Sequence[int]) -> int:
    """The shard `ragrt index add` puts new passages in: the smallest, the last of equals."""
    return min(range(len(counts)), key=lambda j: (counts[j], -j))


def first_rows(counts: Sequence[int]) -> list[int]:
    """The row of each shard's key 0."""
    return [int(r) for r in np.cumsum([0, *counts[:-1]])]


def shard_path(path: str, shard: int, shards: int) -> str:
    """The file of shard `shard` of an index that would be `path` whole: vectors.usearch, or vectors.002.usearch."""
    if shards == 1:
        return path
    p = PurePosixPath(path)
    return str(p.with_name(f"{p.stem}.{shard:03d}{p.suffix}"))


class ShardedIndex:
    """Opened USearch indexes, shard j's keys offset by its first row; reads only, so threads may share it.
    `i8_scale`: the shards' IndexSpec.i8_scale (one for all of a generation's), which queries are cast by."""

    def __init__(self, shards: Sequence, i8_scale: float | None = None):
        self.shards = tuple(shards)
        self.i8_scale = i8_scale
        ndims = {index.ndim for index in self.shards}
        if len(ndims) != 1:
            raise BundleError(f"the index shards have {sorted(ndims)} dims; the corpus is corrupted")
        (self.ndim,) = ndims
        self._first_rows = first_rows([len(index) for index in self.shards])
        # Idle workers exit when the index is dropped (a corpus update swapped it out).
        self._pool = (ThreadPoolExecutor(min(len(self.shards), os.cpu_count() or 1), thread_name_prefix="ragrt-shard")
                      if len(self.shards) > 1 else None)

    def __len__(self) -> int:
        return sum(len(index) for index in self.shards)

    def get(self, rows) -> np.ndarray:
        """The stored vectors of these passage rows, (n, ndim) float32, as usearch's `Index.get`."""
        rows = np.asarray(rows, dtype=np.int64)
        starts = np.asarray(self._first_rows)
        shard = np.searchsorted(starts, rows, side="right") - 1     # an empty shard starts where the next does
        out = np.empty((len(rows), self.ndim), dtype=np.float32)
        for j in np.unique(shard):
            at = shard == j
            out[at] = np.asarray(self.shards[j].get((rows[at] - starts[j]).astype(np.uint64)), dtype=np.float32)
        return out / self.i8_scale if self.i8_scale else out

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, distances), each (n, k) for queries (n, ndim), best first; row -1 (distance inf)
        where fewer than k were found."""
        if self.i8_scale:
            queries = to_int8(queries, self.i8_scale)
        if self._pool is None:
            return _top(self.shards[0], queries, k)
        found = list(self._pool.map(lambda index: _top(index, queries, k), self.shards))
        rows = np.concatenate([np.where(keys >= 0, keys + first, -1)
                               for (keys, _), first in zip(found, self._first_rows)], axis=1)
        distances = np.concatenate([d for _, d in found], axis=1)
        best = np.argsort(distances, axis=1, kind="stable")[:, :k]     # equal distances: the lower shard first
        return np.take_along_axis(rows, best, axis=1), np.take_along_axis(distances, best, axis=1)


def _top(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """One index's (keys, distances), each (n, k), best first; key -1, distance inf past what it found."""
    keys = np.full((len(queries), k), -1, dtype=np.int64)
    distances = np.full((len(queries), k), np.inf, dtype=np.float32)
    width = min(k, len(index))
    if width == 0:
        return keys, distances
    matches = index.search(queries, width)
    # usearch answers one query with Matches, trimmed to what it found, and several with BatchMatches.
    if len(queries) == 1:
        found = len(matches.keys)
        keys[0, :found], distances[0, :found] = matches.keys, matches.distances
    else:
        valid = np.arange(width) < matches.counts[:, None]
        keys[:, :width] = np.where(valid, matches.keys.astype(np.int64), -1)
        distances[:, :width] = np.where(valid, matches.distances, np.inf)
    return keys, distances
