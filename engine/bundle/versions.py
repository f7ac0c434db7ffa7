"""Corpus generations: the index and the passage store, replaced as one unit by renaming a pointer.

    corpus/CURRENT                    "gen-000002 <sha256 of its generation.json>\\n"
    corpus/gen-000002/generation.json GenerationSpec: files, index (and its shards), passages
    corpus/gen-000002/...             the files it lists

A generation directory is never modified once named `gen-*`, nor is any file in it, so an update
may hard-link the files it leaves as they are (index shards it did not touch, passage store segments)
into the next one, and `publish` takes their checksums from the generation they came from instead of
reading them again. An update builds the next one in a temporary directory, fsyncs it, renames it
to `gen-N`, then replaces CURRENT with `os.replace`: a process killed at any point leaves CURRENT
naming either the old generation or the new one.
The generation before the current one is kept until the next update, so a reader that read the
pointer just before a swap still finds its files; readers that have files open keep them anyway
(POSIX keeps unlinked files readable).
"""
from __future__ import annotations

import fcntl
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from ragrt.bundle.atomic import atomic_write_text, fsync_dir, fsync_tree
from ragrt.errors import BundleError, UserInputError
from ragrt.bundle.integrity import check_files, check_inside, sha256_file
from ragrt.bundle.manifest import (GENERATION_SCHEMA, Bm25Spec, FileEntry, GenerationSpec, IndexSpec, PassagesSpec,
                                   written_version)

CORPUS_DIR = "corpus"
POINTER = "CURRENT"
LOCK = "LOCK"
GENERATION_FILE = "generation.json"
INDEX_FILE = "vectors.usearch"     # a generation's files; their names are recorded in generation.json
DATA_FILE = "passages.bin"         # a one-file passage store, and the first data file of a segmented one
OFFSETS_FILE = "offsets.npy"
ROWS_FILE = "rows.npy"              # a segmented store's row table (retrieval/passages.py)
PASSAGE_KV_FILE = "passage_kv.bin"  # optional (`ragrt export --passage-kv all`): decoding/blockstore.py
PASSAGE_KV_INDEX = "passage_kv.idx"
_POINTER = re.compile(r"(gen-(\d{6})) ([0-9a-f]{64})\n")
_GENERATION_DIR = re.compile(r"gen-(\d{6})")
_OPEN_ATTEMPTS = 3


def segment_file(number: int) -> str:
    """The passage data file `ragrt index add` writes for generation `number`: at most one per generation,
    so never the name of one the generation links."""
    return f"passages.{number:06d}.bin"


@dataclass(frozen=True)
class Pointer:
    name: str                      # gen-NNNNNN
    number: int
    sha256: str                    # of the generation's generation.json


@dataclass(frozen=True)
class Generation:
    path: Path                     # the generation directory
    spec: GenerationSpec

    @property
    def name(self) -> str:
        return self.path.name

    def file(self, rel: str) -> Path:
        return self.path / rel


def read_pointer(bundle: Path) -> Pointer:
    path = Path(bundle) / CORPUS_DIR / POINTER
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise BundleError(f"{path}: missing; the bundle has no corpus generation") from None
    # The strict format makes CURRENT check itself: any changed byte breaks the pattern,
    # names a generation that is not there, or gives a sha256 its generation.json fails.
    m = _POINTER.fullmatch(raw.decode("ascii", errors="replace"))
    if m is None:
        raise BundleError(f"{path}: not a generation pointer ('gen-NNNNNN <sha256>'); the bundle is corrupted")
    return Pointer(m[1], int(m[2]), m[3])


def pointer_signature(bundle: Path) -> tuple[int, int, int] | None:
    """Changes whenever CURRENT is replaced; a stat, cheap enough to call on every request."""
    try:
        st = os.stat(Path(bundle) / CORPUS_DIR / POINTER)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def open_generation(bundle: Path, *, manifest_sha256: str, verify: bool = False) -> Generation:
    """The current generation, every file's sha256 checked but the passage KV's, which `verify` adds.

    Always hashed, unlike the models: USearch walks its graph without bounds checks, so a
    corrupted index body (header intact) crashes the process instead of raising. Hashing
    runs at about 1 GB/s: 11 ms for a 6,369-passage corpus (9 MB) on the development machine.
    The passage KV data is treated as the models are (size only): it runs to gigabytes, and its
    index, hashed, bounds every read, so a changed byte gives wrong numbers, never a crash.
    Retried when CURRENT moved on while we read: an update may have removed what it named.
    """
    bundle = Path(bundle)
    for _ in range(_OPEN_ATTEMPTS):
        pointer = read_pointer(bundle)
        try:
            return _open(bundle, pointer, manifest_sha256, verify)
        except BundleError:
            if read_pointer(bundle) == pointer:
                raise
    raise BundleError(f"{bundle / CORPUS_DIR}: the corpus changed {_OPEN_ATTEMPTS} times while it was opened; retry")


def _open(bundle: Path, pointer: Pointer, manifest_sha256: str, verify: bool) -> Generation:
    root = bundle / CORPUS_DIR / pointer.name
    path = root / GENERATION_FILE
    if not path.is_file():
        raise BundleError(f"{path}: missing; {POINTER} names a generation that is not there")
    check_inside(path, bundle)
    if sha256_file(path) != pointer.sha256:
        raise BundleError(f"{path}: sha256 does not match {CORPUS_DIR}/{POINTER}; the bundle is corrupted")
    spec = GenerationSpec.from_json(path.read_text(encoding="utf-8"), where=str(path))
    if spec.number != pointer.number:
        raise BundleError(f"{path}: says generation {spec.number}, {POINTER} says {pointer.number}")
    if spec.manifest_sha256 != manifest_sha256:
        raise BundleError(f"{bundle / 'manifest.json'}: sha256 does not match the one {path} was built with; "
                          "the manifest was modified or the corpus belongs to another bundle")
    for rel in spec.referenced_paths():
        if rel not in spec.files:
            raise BundleError(f"{root / rel}: used by {GENERATION_FILE} but not listed in its files")
    hashed = {rel: e for rel, e in spec.files.items() if verify or rel != PASSAGE_KV_FILE}
    check_files(root, hashed, verify=True, bundle=bundle)
    check_files(root, {rel: e for rel, e in spec.files.items() if rel not in hashed}, verify=False, bundle=bundle)
    return Generation(root, spec)


@contextmanager
def update_lock(bundle: Path) -> Iterator[None]:
    """One writer at a time; the kernel drops the lock when its holder dies, however it dies."""
    corpus = Path(bundle) / CORPUS_DIR
    if not corpus.is_dir():
        raise BundleError(f"{corpus}: missing; is {bundle} a ragrt bundle?")
    try:
        f = open(corpus / LOCK, "a")
    except OSError as e:
        raise UserInputError(f"{corpus}: cannot update the corpus ({e.strerror})") from None
    with f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserInputError(f"{bundle}: another corpus update is running; retry when it ends") from None
        yield


@contextmanager
def staging(bundle: Path) -> Iterator[Path]:
    """A temporary directory inside corpus/ (same filesystem, so it renames), removed unless published."""
    tmp = Path(tempfile.mkdtemp(prefix=".gen-", suffix=".tmp", dir=Path(bundle) / CORPUS_DIR))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(bundle: Path, staged: Path, *, number: int, manifest_sha256: str, index: IndexSpec,
            passages: PassagesSpec, documents: int, shards: tuple[IndexSpec, ...] = (),
            bm25: Bm25Spec | None = None, linked_from: Generation | None = None) -> Generation:
    """Seals `staged` as generation `number` and makes it current; the one swap readers can see.
    `linked_from`: the generation some staged files are hard links into, whose entries they keep."""
    bundle = Path(bundle)
    corpus = bundle / CORPUS_DIR
    spec = GenerationSpec(
        schema=GENERATION_SCHEMA, number=number, created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        manifest_sha256=manifest_sha256, files=_entries(staged, linked_from),
        index=index, passages=passages, documents=documents, shards=tuple(shards), bm25=bm25,
        schema_version=written_version(shards=1 + len(shards), segments=len(passages.data_files)))
    (staged / GENERATION_FILE).write_text(spec.to_json(), encoding="utf-8")
    fsync_tree(staged)
    target = corpus / f"gen-{number:06d}"
    os.replace(staged, target)       # fails on a non-empty target: gen-N is never overwritten
    fsync_dir(corpus)
    atomic_write_text(corpus / POINTER, f"{target.name} {sha256_file(target / GENERATION_FILE)}\n")
    remove_unused(bundle)
    return Generation(target, spec)


def _entries(staged: Path, linked_from: Generation | None) -> dict[str, FileEntry]:
    """Every staged file's sha256 and size, by its relative path. A file that is the very file (same
    inode, same size) `linked_from` lists under that path keeps its entry there instead of being read
    again, gigabytes on a large corpus: a generation's files never change, so the entry still holds,
    and a file damaged since fails verification as it would have, where hashing it would bless it."""
    entries = {}
    for p in sorted(p for p in staged.rglob("*") if p.is_file()):
        rel, st = p.relative_to(staged).as_posix(), p.stat()
        old = linked_from.spec.files.get(rel) if linked_from else None
        if old and old.bytes == st.st_size and _inode(linked_from.file(rel)) == (st.st_dev, st.st_ino):
            entries[rel] = old
        else:
            entries[rel] = FileEntry(sha256_file(p), st.st_size)
    return entries


def _inode(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def remove_unused(bundle: Path) -> None:
    """Removes what no reader can need: staging and pointer temp files left by a killed update,
    generations newer than CURRENT (renamed, then killed before the swap) and all but the newest
    older one."""
    corpus = Path(bundle) / CORPUS_DIR
    current = read_pointer(bundle).number
    older = []
    for p in corpus.iterdir():
        m = _GENERATION_DIR.fullmatch(p.name)
        if p.name.startswith(".gen-") and p.name.endswith(".tmp"):
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith(f".{POINTER}.") and p.name.endswith(".tmp"):
            p.unlink(missing_ok=True)
        elif m and int(m[1]) > current:
            shutil.rmtree(p, ignore_errors=True)
        elif m and int(m[1]) < current:
            older.append(p)
    for p in sorted(older)[:-1]:
        shutil.rmtree(p, ignore_errors=True)
