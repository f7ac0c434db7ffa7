"""The USearch index: the one place that makes, fills and opens one, so export, `ragrt index add/remove`,
the engine and the retrieval benchmark build and read it alike.

Row i of the passage store is key i of the index.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ragrt.bundle.manifest import IndexSpec
from ragrt.errors import BundleError

METRIC = "cos"                     # scores are 1 - distance, which is cosine similarity only under cos
EXPANSION_ADD = 128                # the beam while inserting; not in the manifest, since queries never use it
I8_RANGE_QUANTILE = 0.9999         # |component| mapped to 127 by `i8_scale`; the rarer larger ones clip


def i8_scale(vectors: np.ndarray) -> float:
    """The factor an i8 index stores unit vectors with: 127 over nearly the largest |component|.

    usearch casts a unit vector to int8 as round(127 × x), and a 384-dim embedding's components
    stay under about 0.25, so it uses some 60 of the 255 levels; cosine is scale-free, so ragrt
    casts with this factor itself and usearch stores the int8 as given. Measured on real-derived
    MiniLM vectors: exact-search recall@10 0.91 with usearch's cast, 0.98 with this one.
    """
    sample = np.asarray(vectors[:: max(1, len(vectors) // 100_000)], dtype=np.float32)
    return float(127.0 / max(float(np.quantile(np.abs(sample), I8_RANGE_QUANTILE)), 1e-6))


def stored(vectors: np.ndarray, spec: IndexSpec) -> np.ndarray:
    """Vectors (or queries) as `spec`'s index holds them: int8 cast by the spec's `i8_scale`, if it
    has one; otherwise as given, for usearch to cast. int8 input (an index's own rows) passes as is."""
    if spec.dtype != "i8" or spec.i8_scale is None or vectors.dtype == np.int8:
        return vectors
    return to_int8(vectors, spec.i8_scale)


def to_int8(vectors: np.ndarray, scale: float, chunk: int = 65536) -> np.ndarray:
    """round(vectors × scale) clipped to ±127, a chunk of rows at a time (a 625,000-row shard would
    otherwise hold float32 temporaries of 1 GB each)."""
    out = np.empty(vectors.shape, dtype=np.int8)
    for start in range(0, len(vectors), chunk):
        x = np.multiply(vectors[start:start + chunk], scale, dtype=np.float32)
        np.rint(x, out=x)
        np.clip(x, -127, 127, out=x)
        out[start:start + chunk] = x
    return out


def new_index(spec: IndexSpec, *, expansion_add: int = EXPANSION_ADD):
    """An empty index with the spec's metric, dtype, dims and graph settings (its path and count are not used)."""
    from usearch.index import Index
    return Index(ndim=spec.ndim, metric=spec.metric, dtype=spec.dtype, connectivity=spec.connectivity,
                 expansion_add=expansion_add, expansion_search=spec.expansion_search)


def build_index(vectors: np.ndarray, spec: IndexSpec, *, expansion_add: int = EXPANSION_ADD, threads: int = 0,
                log: str | bool = False):
    """`new_index` holding row i of `vectors` (n, ndim) under key i."""
    index = new_index(spec, expansion_add=expansion_add)
    if len(vectors):
        index.add(np.arange(len(vectors), dtype=np.uint64), np.ascontiguousarray(stored(vectors, spec)),
                  threads=threads, log=log)
    return index


def open_index(path: Path, spec: IndexSpec, *, view: bool = True):
    """The index file at `path`, checked against the manifest's `spec`.

    view=True memory-maps the file (read-only: the index costs page cache, not process memory);
    view=False loads a private, writable copy.
    """
    from usearch.index import Index
    try:
        index = Index.restore(str(path), view=view)
    except Exception as e:  # usearch raises plain RuntimeError/ValueError on a bad file
        raise BundleError(f"{path}: not a readable USearch index ({e})") from None
    if index is None:          # restore's answer for a missing or headerless file
        raise BundleError(f"{path}: not a readable USearch index")
    metric = index.metric.name.lower()
    if metric != METRIC or spec.metric != METRIC:
        raise BundleError(f"{path}: index metric is {metric!r}, manifest says {spec.metric!r}; ragrt needs {METRIC!r}")
    if index.ndim != spec.ndim or len(index) != spec.count:
        raise BundleError(f"{path}: index holds {len(index)} vectors of {index.ndim} dims, "
                          f"manifest says {spec.count} of {spec.ndim}")
    return index
