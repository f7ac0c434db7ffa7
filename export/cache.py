"""A user cache of converted and exported models, keyed by the content they were built from.

A new corpus then costs only its index: the GGUF conversion, the ONNX exports, the
quantization and the parity runs happen once per checkpoint per machine.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Callable

from ragrt.bundle.atomic import atomic_write_text

_DONE = ".complete"
_LINEAGE = ".lineage"
_RECIPE = ".recipe"
_MEMO_MIN_BYTES = 16 << 20


def cache_root() -> Path:
    if os.environ.get("RAGRT_CACHE"):
        return Path(os.environ["RAGRT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ragrt"


def _file_sha256(path: Path) -> str:
    """sha256 of a file; a big one's is remembered by (path, size, mtime) so it is hashed once."""
    st = path.stat()
    if st.st_size < _MEMO_MIN_BYTES:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    memo_path = cache_root() / "hashes.json"
    ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    if ident in memo:
        return memo[ident]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    # Entries of deleted files (temp dirs, replaced checkpoints) would otherwise pile up.
    memo = {k: v for k, v in memo.items() if Path(k.rsplit("|", 2)[0]).exists()}
    memo[ident] = h.hexdigest()
    atomic_write_text(memo_path, json.dumps(memo))
    return memo[ident]


def content_key(*parts: str | Path) -> str:
    """A hex key over files (their bytes), directories (relative names and bytes) and strings."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path) and part.is_dir():
            for f in sorted(p for p in part.rglob("*") if p.is_file()):
                h.update(f.relative_to(part).as_posix().encode() + b"\0" + _file_sha256(f).encode())
        elif isinstance(part, Path):
            h.update(_file_sha256(part).encode())
        else:
            h.update(str(part).encode())
        h.update(b"\x1f")
    return h.hexdigest()[:32]


def cached_dir(kind: str, key: str, build: Callable[[Path], None], lineage: str | None = None,
               recipe: str | None = None) -> Path:
    """`cache_root()/kind/key`, calling `build(tmp)` first if it is not there yet.

    The entry appears by one rename of a finished directory, so a crash or a failing build
    never leaves a half-built entry that a later run would trust.

    `lineage` names what the entry is built from, without the recipe version that `key` also
    covers. Once a new entry is in place, other entries of the same kind and lineage were made
    by another recipe (an older ragrt): nothing reaches them again, so they are deleted.
    With `recipe` (the recipe version in `key`), only the entries of that lineage made by
    another recipe go: siblings of one recipe (one graph variant each, say) stay side by side.
    """
    final = cache_root() / kind / key
    if (final / _DONE).exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(final.parent, key)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.{_builder_id()}.", dir=final.parent))
    try:
        build(tmp)
        if lineage is not None:
            (tmp / _LINEAGE).write_text(lineage)
        if recipe is not None:
            (tmp / _RECIPE).write_text(recipe)
        (tmp / _DONE).touch()
        if not (final / _DONE).exists():          # else another process finished first: keep theirs
            shutil.rmtree(final, ignore_errors=True)   # a leftover without the marker is never trusted
            try:
                os.replace(tmp, final)
            except OSError:
                if not (final / _DONE).exists():   # lost a race to a complete entry: fine
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if lineage is not None:
        _remove_superseded(final, lineage, recipe)
    return final


def _remove_superseded(entry: Path, lineage: str, recipe: str | None) -> None:
    for other in entry.parent.iterdir():
        if other.name.startswith(".") or other == entry:
            continue
        try:
            if (other / _LINEAGE).read_text() != lineage:
                continue
        except OSError:                   # no lineage: an entry of a ragrt before lineages
            continue
        if recipe is not None and (other / _RECIPE).is_file() and (other / _RECIPE).read_text() == recipe:
            continue                      # a sibling of the same recipe
        shutil.rmtree(other, ignore_errors=True)


def _builder_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _remove_orphans(parent: Path, key: str) -> None:
    """Deletes build dirs of `key` left by a process of this host that no longer runs.

    A killed export (SIGKILL skips the cleanup above) leaves one, often a gigabyte. A build
    dir of another host, or of a process still running, is left alone.
    """
    host = socket.gethostname()
    for path in parent.glob(f".{key}.{host}-*.*"):
        pid = path.name[len(f".{key}.{host}-"):].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                     # another user's process
        return True
    return True
