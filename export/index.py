"""Embedding the passages and building the USearch index and the passage store."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from engine.encoder import TextEncoder
from engine.errors import UserInputError
from engine.store import PassageRecord, passage_text, write_passage_store

DTYPES = ("f16", "i8", "f32")


@dataclass(frozen=True)
class IndexBuild:
    count: int
    ndim: int
    dtype: str
    metric: str
    connectivity: int
    expansion_search: int
    seconds_embed: float
    seconds_index: float


def build_index(passages: Iterable[PassageRecord] | Sequence[PassageRecord], encoder: TextEncoder, *,
                index_path: Path, data_path: Path, offsets_path: Path, dtype: str = "f16",
                connectivity: int = 16, expansion_add: int = 128, expansion_search: int = 128, batch_size: int = 32,
                progress: bool = True) -> IndexBuild:
    """Embeds through the engine's own TextEncoder, so passages and queries share one code path."""
    from tqdm import tqdm
    from usearch.index import Index
    if dtype not in DTYPES:
        raise UserInputError(f"index dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    # Read twice (embedding, then the store), so a one-shot iterator is materialised first.
    passages = passages if isinstance(passages, Sequence) else list(passages)
    index_path = Path(index_path)
    t0 = time.perf_counter()
    vectors = np.empty((len(passages), encoder.dim), dtype=np.float32)
    row = 0
    with tqdm(total=len(passages), desc="embedding passages", unit="passage", disable=not progress) as bar:
        for batch in encoder.embed((passage_text(p) for p in passages), batch_size=batch_size):
            vectors[row:row + len(batch)] = batch
            row += len(batch)
            bar.update(len(batch))
    t1 = time.perf_counter()
    index = Index(ndim=encoder.dim, metric="cos", dtype=dtype, connectivity=connectivity,
                  expansion_add=expansion_add, expansion_search=expansion_search)
    if len(passages):
        index.add(np.arange(len(passages), dtype=np.uint64), vectors, log="building index" if progress else False)
    tmp = index_path.with_name(index_path.name + ".tmp")
    try:
        index.save(str(tmp))
        os.replace(tmp, index_path)
    finally:
        tmp.unlink(missing_ok=True)
    t2 = time.perf_counter()
    write_passage_store(data_path, offsets_path, passages)
    return IndexBuild(len(passages), encoder.dim, dtype, "cos", connectivity, expansion_search, t1 - t0, t2 - t1)
