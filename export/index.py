"""Embedding the passages and building the USearch index (or its shards) and the passage store."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ragrt.retrieval.encoder import TextEncoder, embed_passages
from ragrt.errors import UserInputError
import ragrt.retrieval.index as usearch_index
from ragrt.bundle.manifest import IndexSpec
from ragrt.retrieval.passages import Passage, passage_text, write_passage_store
from ragrt.retrieval.shards import shard_path, shard_sizes

DTYPES = ("f16", "i8", "f32")


@dataclass(frozen=True)
class IndexBuild:
    count: int
    ndim: int
    dtype: str
    metric: str
    connectivity: int
    expansion_search: int
    seconds_index: float
    shards: tuple[IndexSpec, ...]  # every shard, paths relative to the index's directory


def cached_embeddings(passages: Sequence[Passage], encoder: TextEncoder, model_key: str,
                      progress: bool = True) -> tuple[np.ndarray, float]:
    """`embed_passages`, kept in the user cache under `model_key` (the encoder graph's and its
    tokenizer's content) and the passages' content,
    so exporting the same corpus again (another --quantize or --graph) skips the embedding.
    Returns the vectors and the seconds spent embedding (0 on a hit)."""
    import hashlib

    from ragrt.export.cache import cached_dir, content_key
    digest = hashlib.sha256()
    for p in passages:
        digest.update(passage_text(p).encode("utf-8", "surrogatepass") + b"\0")
    spent = [0.0]
    # Passages embedded with a prefix are other vectors; without one, the key is what it was before prefixes.
    prefix = [f"prefix-{encoder.prefixes[True]}"] if encoder.prefixes[True] else []

    def build(tmp: Path) -> None:
        t0 = time.perf_counter()
        np.save(tmp / "vectors.npy", embed_passages(passages, encoder, progress=progress))
        spent[0] = time.perf_counter() - t0

    entry = cached_dir("embeddings", content_key(model_key, digest.hexdigest(), f"max_length-{encoder.max_length}",
                                                      *prefix), build)
    vectors = np.load(entry / "vectors.npy")
    if vectors.shape != (len(passages), encoder.dim):
        raise UserInputError(f"{entry}: cached embeddings have shape {vectors.shape}; delete that directory")
    return vectors, spent[0]


def build_index(passages: Sequence[Passage], vectors: np.ndarray, *,
                index_path: Path, data_path: Path, offsets_path: Path, dtype: str = "f16",
                connectivity: int = 16, expansion_add: int = usearch_index.EXPANSION_ADD, expansion_search: int = 128,
                shards: int = 1, progress: bool = True) -> IndexBuild:
    """The USearch index of `vectors` (row i is passage i) and the passage store. With `shards` > 1
    the index is that many files of consecutive rows beside `index_path`, named by `shard_path`."""
    if dtype not in DTYPES:
        raise UserInputError(f"index dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if shards < 1:
        raise UserInputError(f"index shards must be at least 1, got {shards}")
    index_path = Path(index_path)
    t1 = time.perf_counter()
    ndim = vectors.shape[1]
    scale = usearch_index.i8_scale(vectors) if dtype == "i8" and len(vectors) else None
    specs, start = [], 0
    for j, count in enumerate(shard_sizes(len(passages), shards)):
        spec = IndexSpec(path=shard_path(index_path.name, j, shards), metric=usearch_index.METRIC, dtype=dtype,
                         ndim=ndim, count=count, connectivity=connectivity, expansion_search=expansion_search,
                         i8_scale=scale)
        what = "building index" if shards == 1 else f"building index shard {j + 1}/{shards}"
        index = usearch_index.build_index(vectors[start:start + count], spec, expansion_add=expansion_add,
                                          log=what if progress else False)
        _save(index, index_path.with_name(spec.path))
        specs.append(spec)
        start += count
    t2 = time.perf_counter()
    write_passage_store(data_path, offsets_path, passages)
    return IndexBuild(len(passages), ndim, dtype, usearch_index.METRIC, connectivity, expansion_search, t2 - t1,
                      tuple(specs))


def _save(index, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        index.save(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
