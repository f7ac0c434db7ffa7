"""`Retriever`: question -> top-k passages, through a memory-mapped USearch index."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .encoder import TextEncoder
from .errors import BundleError
from .manifest import Manifest
from .store import PassageStore


@dataclass(frozen=True)
class Hit:
    row: int
    id: str
    title: str
    text: str
    score: float                   # cosine similarity


class Retriever:
    def __init__(self, index, store: PassageStore, encoder: TextEncoder):
        self.index = index
        self.store = store
        self.encoder = encoder

    @classmethod
    def open(cls, root: Path, manifest: Manifest, encoder: TextEncoder) -> "Retriever":
        from usearch.index import Index
        spec = manifest.index
        path = root / spec.path
        try:
            # view=True memory-maps the file: the index costs page cache, not process memory.
            index = Index.restore(str(path), view=True)
        except Exception as e:  # usearch raises plain RuntimeError/ValueError on a bad file
            raise BundleError(f"{path}: not a readable USearch index ({e})") from None
        if index is None:
            raise BundleError(f"{path}: not a readable USearch index")
        if index.ndim != spec.ndim or len(index) != spec.count:
            raise BundleError(f"{path}: index holds {len(index)} vectors of {index.ndim} dims, "
                              f"manifest says {spec.count} of {spec.ndim}")
        index.expansion_search = spec.expansion_search
        store = PassageStore.open(root / manifest.passages.data, root / manifest.passages.offsets,
                                  count=manifest.passages.count)
        if len(store) != spec.count:
            raise BundleError(f"{root}: the index holds {spec.count} passages but the store {len(store)}")
        return cls(index, store, encoder)

    def search(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        """Top-k passages for each row of `queries` (n, dim), best first."""
        k = min(k, len(self.store))
        if k == 0:
            return [[] for _ in range(len(queries))]
        matches = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        # usearch answers one query with Matches and several with BatchMatches.
        rows = [matches] if len(queries) == 1 else [matches[i] for i in range(len(queries))]
        out = []
        for m in rows:
            hits = []
            for key, dist in zip(m.keys, m.distances):
                rec = self.store.get(int(key))
                hits.append(Hit(int(key), rec.id, rec.title, rec.text, 1.0 - float(dist)))
            out.append(hits)
        return out

    def retrieve(self, query: str, k: int) -> list[Hit]:
        return self.search(self.encoder.embed_all([query]), k)[0]
