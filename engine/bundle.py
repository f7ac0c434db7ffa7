"""Opening a bundle directory: read the manifest, then check its files before anything uses them."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import BundleError
from .generation import Generation, open_generation
from .integrity import check_files, sha256_file
from .manifest import MANIFEST_NAME, Manifest, read_manifest


@dataclass(frozen=True)
class Bundle:
    root: Path
    manifest: Manifest
    manifest_sha256: str
    generation: Generation         # the corpus generation that was current at open

    @classmethod
    def open(cls, root: str | Path, *, verify: bool = False) -> "Bundle":
        """Reads the manifest and checks every listed file's size; `verify` also checks sha256.

        Sizes catch truncation at no cost; hashing a 200 MB bundle takes about a second,
        so it is left to `ragrt verify` and to callers that ask for it. The small JSON files
        (manifest, generation) are hashed at every open.
        """
        root = Path(root)
        manifest = read_manifest(root)
        for rel in manifest.referenced_paths():
            if rel not in manifest.files:
                raise BundleError(f"{root / rel}: used by the manifest but not listed in its files")
        manifest_sha256 = sha256_file(root / MANIFEST_NAME)
        generation = open_generation(root, manifest_sha256=manifest_sha256, verify=verify)
        check_files(root, manifest.files, verify=verify)
        return cls(root, manifest, manifest_sha256, generation)

    def path(self, rel: str) -> Path:
        return self.root / rel

    def file_count(self) -> int:
        """Files covered by a checksum: the manifest's, the generation's, and the two JSON files themselves."""
        return len(self.manifest.files) + len(self.generation.spec.files) + 2
