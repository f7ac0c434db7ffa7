"""Opening a bundle directory: read the manifest, then check its files before anything uses them."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ragrt.errors import BundleError
from ragrt.bundle.versions import Generation, open_generation
from ragrt.bundle.integrity import check_files, sha256_file
from ragrt.bundle.manifest import MANIFEST_NAME, Manifest, read_manifest


@dataclass(frozen=True)
class Bundle:
    root: Path
    manifest: Manifest
    manifest_sha256: str
    generation: Generation         # the corpus generation that was current at open

    @classmethod
    def open(cls, root: str | Path, *, verify: bool = False) -> "Bundle":
        """Reads the manifest, checks every model file's size and the corpus generation's sha256;
        `verify` also checks the models' sha256.

        Model sizes catch truncation at no cost, and onnxruntime and tokenizers refuse a garbled
        file with an error; hashing 200 MB of models takes 0.2 s more, so it is left to
        `ragrt verify` and to callers that ask for it. manifest.json, the corpus pointer and the
        corpus generation are checked at every open (engine/bundle/versions.py says why).
        """
        root = Path(root)
        manifest = read_manifest(root)
        for rel in manifest.referenced_paths():
            if rel not in manifest.files:
                raise BundleError(f"{root / rel}: used by the manifest but not listed in its files")
        manifest_sha256 = sha256_file(root / MANIFEST_NAME)
        generation = open_generation(root, manifest_sha256=manifest_sha256, verify=verify)
        check_files(root, manifest.files, verify=verify, bundle=root)
        return cls(root, manifest, manifest_sha256, generation)

    def path(self, rel: str) -> Path:
        return self.root / rel

    def file_count(self) -> int:
        """Files covered by a checksum: the manifest's, the generation's, and the two JSON files themselves."""
        return len(self.manifest.files) + len(self.generation.spec.files) + 2
