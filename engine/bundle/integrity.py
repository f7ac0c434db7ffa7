"""Checksums of bundle files: sizes at every open (free), sha256 when asked (a read of every byte)."""
from __future__ import annotations

import hashlib
from pathlib import Path

from ragrt.errors import BundleError
from ragrt.bundle.manifest import FileEntry


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entries(root: Path, names: list[Path]) -> dict[str, FileEntry]:
    """Entries for `names` (paths under `root`), keyed by their relative POSIX path."""
    return {p.relative_to(root).as_posix(): FileEntry(sha256_file(p), p.stat().st_size) for p in sorted(names)}


def check_inside(path: Path, bundle: Path) -> None:
    """Manifest paths cannot climb out of the bundle; a symbolic link could, so it may not either."""
    if not path.resolve().is_relative_to(Path(bundle).resolve()):
        raise BundleError(f"{path}: a link to {path.resolve()}, outside the bundle")


def check_files(root: Path, files: dict[str, FileEntry], *, verify: bool, bundle: Path) -> None:
    """Every listed file exists inside `bundle` with its size; with `verify`, also its sha256.
    `root` is the directory the paths are relative to. Errors name the file."""
    for rel, entry in sorted(files.items()):
        p = root / rel
        if not p.is_file():
            raise BundleError(f"{p}: missing from the bundle")
        check_inside(p, bundle)
        size = p.stat().st_size
        if size != entry.bytes:
            raise BundleError(f"{p}: size {size} bytes, manifest says {entry.bytes}; the bundle is corrupted")
        if verify and sha256_file(p) != entry.sha256:
            raise BundleError(f"{p}: sha256 does not match the manifest; the bundle is corrupted")
