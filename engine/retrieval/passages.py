"""Passages, the one shape a piece of the corpus has from chunking to the answer, and the passage
store: passages memory-mapped from disk, fetched by row in O(1), never loaded whole.

A store is one or more immutable data files of records back to back (PassagesSpec, docs/bundle.md),
read as one concatenation, and a row table of where each row's record lies in it. Export and
`ragrt index remove` write one data file (`write_passage_store`, the layout from before segments);
`ragrt index add` appends a segment (`add_segment`): the new records go in a new data file, the old
ones stay linked as they are, and only the row table, 16 bytes a row, is written whole, so an
addition costs what it adds, not what the store holds.
"""
from __future__ import annotations

import json
import mmap
import os
import re
from bisect import bisect_right
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from ragrt.bundle.manifest import PassagesSpec
from ragrt.errors import BundleError, UserInputError

_ID = re.compile(rb'\{"id":"([^"\\]*)"')   # how _record starts a record whose id has no escapes
_CHUNK = 1 << 20                   # rows per slice when a loop walks the row table


@dataclass(frozen=True)
class Passage:
    id: str                        # passage_id(document id, n)
    title: str                     # the document's
    text: str


def passage_id(document_id: str, n: int) -> str:
    """The id of a document's n-th passage (from 0). `ragrt index remove` takes either kind of id."""
    return f"{document_id}#{n}"


def document_of(passage_id: str) -> str:
    """The id of the document a passage came from; document ids may hold '#' themselves."""
    return passage_id.rsplit("#", 1)[0]


def write_passage_store(data_path: Path, offsets_path: Path, records: Iterable[Passage]) -> int:
    """Writes one data file and its offsets through temp files renamed into place; returns the count.

    A failure part-way (a bad record, a full disk) leaves any earlier store untouched and no temp files.
    """
    data_path, offsets_path = Path(data_path), Path(offsets_path)
    tmp_data = data_path.with_name(data_path.name + ".tmp")
    tmp_offsets = offsets_path.with_name(offsets_path.name + ".tmp.npy")   # np.save appends .npy otherwise
    try:
        offsets = _write_records(tmp_data, records, mode="wb")
        np.save(tmp_offsets, offsets, allow_pickle=False)
        os.replace(tmp_data, data_path)
        os.replace(tmp_offsets, offsets_path)
    finally:
        tmp_data.unlink(missing_ok=True)
        tmp_offsets.unlink(missing_ok=True)
    return len(offsets) - 1


def add_segment(store: PassageStore, root: Path, *, segment: str, rows: str, records: Iterable[Passage],
                at: int) -> PassagesSpec:
    """The spec of `store` with `records` added as their rows at `at` (the rows from `at` on move down).

    Writes into `root`, where the store's data files must already be (hard-linked: they are not
    touched): the records as the new data file `segment` and the new row table `rows`. Both are
    created, never overwritten, so a name clash cannot write into a linked file.
    """
    root = Path(root)
    added = _write_records(root / segment, records, mode="xb")
    n = len(store) + len(added) - 1
    # (start, end) into the concatenation, not (segment, start, end): 16 bytes a row instead of 24,
    # and the old offsets are positions in that concatenation too; a read bisects a few segment starts.
    new_rows = np.stack([added[:-1], added[1:]], axis=1) + np.uint64(store.nbytes)
    with open(root / rows, "xb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": np.dtype(np.uint64).str, "fortran_order": False,
                                                 "shape": (n, 2)})
        for part in (store.rows(0, at), [new_rows], store.rows(at, len(store))):
            for block in part:
                f.write(np.ascontiguousarray(block, dtype=np.uint64).tobytes())
    return replace(store.spec, offsets=rows, count=n, segments=(*store.spec.segments, segment))


def _write_records(path: Path, records: Iterable[Passage], *, mode: str) -> np.ndarray:
    """Writes the records back to back, fsynced; their offsets in the file, uint64 [count + 1]."""
    offsets = [0]
    with open(path, mode) as f:
        for r in records:
            blob = _record(r)
            f.write(blob)
            offsets.append(offsets[-1] + len(blob))
        f.flush()
        os.fsync(f.fileno())       # no rename (of the file or its staging directory) may land before the bytes
    return np.asarray(offsets, dtype=np.uint64)


def _record(p: Passage) -> bytes:
    return json.dumps({"id": p.id, "title": p.title, "text": p.text}, ensure_ascii=False,
                      separators=(",", ":")).encode("utf-8")


def passage_text(p: Passage) -> str:
    """What gets embedded for a passage (queries are embedded as they are).

    The title is included because it carries the section a chunk came from, which its text
    often lacks. Export, `ragrt index add` and fine-tuning all embed passages through this.
    """
    return f"{p.title}\n{p.text}" if p.title else p.text


class PassageStore:
    """Reads are slices of read-only mmaps, so one store can serve many threads."""

    def __init__(self, spec: PassagesSpec, segments: list[mmap.mmap | bytes], bounds: list[int],
                 starts: np.ndarray, ends: np.ndarray, path: Path):
        self.spec = spec
        self._segments = segments      # the data files' contents, in concatenation order
        self._bounds = bounds          # where each data file starts in the concatenation, then its end
        self._starts = starts          # uint64 [count]: each record's first byte in the concatenation
        self._ends = ends              # and the byte after its last
        self._path = path              # the row table, which errors name
        self._rows: dict[str, int] | None = None

    @classmethod
    def open(cls, root: Path, spec: PassagesSpec) -> "PassageStore":
        """The store `spec` describes, its paths relative to `root` (a corpus generation).

        Checks the row table's dtype and shape and that it ends inside the data; a record in
        between is checked when it is read.
        """
        root = Path(root)
        table_path = root / spec.offsets
        for p in (*(root / rel for rel in spec.data_files), table_path):
            if not p.is_file():
                raise BundleError(f"{p}: passage store file is missing")
        try:
            table = np.load(table_path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise BundleError(f"{table_path}: not a valid offsets array ({e})") from None
        shape = (spec.count, 2) if spec.segments else (spec.count + 1,)
        if table.dtype != np.uint64 or table.shape != shape:
            raise BundleError(f"{table_path}: expected uint64{list(shape)}, found {table.dtype}{list(table.shape)}")
        segments, bounds = [], [0]
        for rel in spec.data_files:
            with open(root / rel, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                # mmap cannot map an empty file; an empty segment has nothing to read anyway.
                segments.append(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b"")
            bounds.append(bounds[-1] + size)
        if spec.segments:
            starts, ends = table[:, 0], table[:, 1]
        else:
            starts, ends = table[:-1], table[1:]
            if int(table[0]) != 0 or int(table[-1]) != bounds[-1]:
                raise BundleError(f"{table_path}: offsets do not cover {spec.data} ({bounds[-1]} bytes)")
        return cls(spec, segments, bounds, starts, ends, table_path)

    def __len__(self) -> int:
        return len(self._starts)

    @property
    def nbytes(self) -> int:
        """The data files' size together: where a segment added next would start."""
        return self._bounds[-1]

    def get(self, row: int) -> Passage:
        if not 0 <= row < len(self):
            raise UserInputError(f"passage row {row} is out of range (0..{len(self) - 1})")
        try:
            data, start, end = self._locate(row, int(self._starts[row]), int(self._ends[row]))
            raw = json.loads(data[start:end].decode("utf-8"))
            return Passage(raw["id"], raw["title"], raw["text"])
        except (ValueError, KeyError, TypeError):
            raise BundleError(f"{self._path}: passage record {row} is corrupted") from None

    def ids(self) -> Iterator[str]:
        """Every row's passage id, in row order, read without decoding the rest of its record.

        `_record` writes the id first, so an id without escapes is the bytes up to the next quote;
        any other record is parsed whole. `ragrt index add` checks every document id: 1M ids of
        records with 700 bytes of text read in 0.5 s, where parsing the records took 3.5 s.
        """
        match, bounds = _ID.match, np.asarray(self._bounds, dtype=np.uint64)
        for first in range(0, len(self), _CHUNK):
            starts, ends = self._starts[first:first + _CHUNK], self._ends[first:first + _CHUNK]
            # _locate for a chunk at once: numpy scalars one by one would cost more than the match
            seg = np.minimum(np.searchsorted(bounds, starts, side="right") - 1, len(self._segments) - 1)
            inside = (starts <= ends) & (ends <= bounds[seg + 1])
            chunk = zip(range(first, first + len(starts)), seg.tolist(), (starts - bounds[seg]).tolist(),
                        (ends - bounds[seg]).tolist(), inside.tolist())
            for row, s, start, end, ok in chunk:
                m = match(self._segments[s], start, end) if ok else None
                try:
                    yield m[1].decode("utf-8") if m else self.get(row).id    # get() names what is wrong
                except UnicodeDecodeError:
                    yield self.get(row).id

    def rows(self, first: int, stop: int) -> Iterator[np.ndarray]:
        """Rows first..stop-1 of the row table as (start, end) pairs, uint64 (n, 2), in slices."""
        for lo in range(first, stop, _CHUNK):
            hi = min(lo + _CHUNK, stop)
            yield np.stack([self._starts[lo:hi], self._ends[lo:hi]], axis=1)

    def row_of(self, passage_id: str) -> int:
        """The row of a passage id. The id map is built on the first call (one O(n) scan of the store).

        Two threads racing on the first call both build the same map; the assignment is atomic.
        """
        if self._rows is None:
            self._rows = {pid: i for i, pid in enumerate(self.ids())}
        if passage_id not in self._rows:
            raise UserInputError(f"no passage with id {passage_id!r}")
        return self._rows[passage_id]

    def _locate(self, row: int, start: int, end: int) -> tuple[mmap.mmap | bytes, int, int]:
        """The data file holding a record, and the record's bounds in it."""
        s = bisect_right(self._bounds, start) - 1    # the last data file starting at or before it: not an empty one
        if s >= len(self._segments) or not start <= end <= self._bounds[s + 1]:
            raise BundleError(f"{self._path}: passage record {row} lies outside the passage data")
        return self._segments[s], start - self._bounds[s], end - self._bounds[s]
