"""Opening a bundle directory: read the manifest, then check its files before anything uses them."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from .errors import BundleError
from .manifest import Manifest, read_manifest


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Bundle:
    root: Path
    manifest: Manifest

    @classmethod
    def open(cls, root: str | Path, *, verify: bool = False) -> "Bundle":
        """Reads the manifest and checks every listed file's size; `verify` also checks sha256.

        Sizes catch truncation at no cost; hashing a 200 MB bundle takes about a second,
        so it is left to `ragrt verify` and to callers that ask for it.
        """
        root = Path(root)
        manifest = read_manifest(root)
        bundle = cls(root, manifest)
        for rel in manifest.referenced_paths():
            if rel not in manifest.files:
                raise BundleError(f"{root / rel}: used by the manifest but not listed in its files")
        bundle.check(verify=verify)
        return bundle

    def path(self, rel: str) -> Path:
        return self.root / rel

    def check(self, *, verify: bool) -> None:
        for rel, entry in sorted(self.manifest.files.items()):
            p = self.root / rel
            if not p.is_file():
                raise BundleError(f"{p}: missing from the bundle")
            size = p.stat().st_size
            if size != entry.bytes:
                raise BundleError(f"{p}: size {size} bytes, manifest says {entry.bytes}; the bundle is corrupted")
            if verify and sha256_file(p) != entry.sha256:
                raise BundleError(f"{p}: sha256 does not match the manifest; the bundle is corrupted")
