"""Passages, the one shape a piece of the corpus has from chunking to the answer, and the passage
store: passages memory-mapped from disk, fetched by row in O(1), never loaded whole."""
from __future__ import annotations

import json
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from ragrt.errors import BundleError, UserInputError


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
    """Writes the data file and its offsets through temp files renamed into place; returns the count.

    A failure part-way (a bad record, a full disk) leaves any earlier store untouched and no temp files.
    """
    data_path, offsets_path = Path(data_path), Path(offsets_path)
    tmp_data = data_path.with_name(data_path.name + ".tmp")
    tmp_offsets = offsets_path.with_name(offsets_path.name + ".tmp.npy")   # np.save appends .npy otherwise
    offsets = [0]
    try:
        with open(tmp_data, "wb") as f:
            for r in records:
                blob = json.dumps({"id": r.id, "title": r.title, "text": r.text}, ensure_ascii=False,
                                  separators=(",", ":")).encode("utf-8")
                f.write(blob)
                offsets.append(offsets[-1] + len(blob))
            f.flush()
            os.fsync(f.fileno())   # the rename must not land before the bytes do
        np.save(tmp_offsets, np.asarray(offsets, dtype=np.uint64), allow_pickle=False)
        os.replace(tmp_data, data_path)
        os.replace(tmp_offsets, offsets_path)
    finally:
        tmp_data.unlink(missing_ok=True)
        tmp_offsets.unlink(missing_ok=True)
    return len(offsets) - 1


def passage_text(p: Passage) -> str:
    """What gets embedded for a passage (queries are embedded as they are).

    The title is included because it carries the section a chunk came from, which its text
    often lacks. Export, `ragrt index add` and fine-tuning all embed passages through this.
    """
    return f"{p.title}\n{p.text}" if p.title else p.text


class PassageStore:
    """Reads are slices of a read-only mmap, so one store can serve many threads."""

    def __init__(self, data: mmap.mmap | bytes, offsets: np.ndarray, data_path: Path):
        self._data = data
        self._offsets = offsets
        self._path = data_path
        self._rows: dict[str, int] | None = None

    @classmethod
    def open(cls, data_path: Path, offsets_path: Path, *, count: int) -> "PassageStore":
        """Checks the offsets' dtype, length and ends; a record in between is checked when it is read."""
        data_path, offsets_path = Path(data_path), Path(offsets_path)
        for p in (data_path, offsets_path):
            if not p.is_file():
                raise BundleError(f"{p}: passage store file is missing")
        try:
            offsets = np.load(offsets_path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise BundleError(f"{offsets_path}: not a valid offsets array ({e})") from None
        if offsets.dtype != np.uint64 or offsets.shape != (count + 1,):
            raise BundleError(f"{offsets_path}: expected uint64[{count + 1}], found {offsets.dtype}{list(offsets.shape)}")
        size = data_path.stat().st_size
        if int(offsets[0]) != 0 or int(offsets[-1]) != size:
            raise BundleError(f"{offsets_path}: offsets do not cover {data_path.name} ({size} bytes)")
        with open(data_path, "rb") as f:
            # mmap cannot map an empty file; an empty store has nothing to read anyway.
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        return cls(data, offsets, data_path)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def get(self, row: int) -> Passage:
        if not 0 <= row < len(self):
            raise UserInputError(f"passage row {row} is out of range (0..{len(self) - 1})")
        start, end = int(self._offsets[row]), int(self._offsets[row + 1])
        try:
            raw = json.loads(self._data[start:end].decode("utf-8"))
            return Passage(raw["id"], raw["title"], raw["text"])
        except (ValueError, KeyError, TypeError):
            raise BundleError(f"{self._path}: passage record {row} is corrupted") from None

    def row_of(self, passage_id: str) -> int:
        """The row of a passage id. The id map is built on the first call (one O(n) scan of the store).

        Two threads racing on the first call both build the same map; the assignment is atomic.
        """
        if self._rows is None:
            self._rows = {self.get(i).id: i for i in range(len(self))}
        if passage_id not in self._rows:
            raise UserInputError(f"no passage with id {passage_id!r}")
        return self._rows[passage_id]
