"""Copies of a bundle with manifest fields changed: the tiny bundle as another export would write it."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from ragrt.bundle.integrity import sha256_file
from ragrt.bundle.manifest import MANIFEST_NAME

# Passages render alike at any rank, so their keys and values can be reused: passage KV available.
UNNUMBERED = {"prompt": {"passage": "{title}\n{text}"}}
# A manifest from before the rotary fields were recorded: passage KV unavailable.
NO_ROTARY = {"generator": {"rotary_base": 0.0, "rotary_dim": 0}}


def bundle_variant(bundle: Path, out: Path, changes: dict[str, dict]) -> Path:
    """`bundle` copied to `out`, each manifest section updated with its changed fields, and the
    corpus generation sealed again to the new manifest (as an export seals it)."""
    shutil.copytree(bundle, out)
    manifest = out / MANIFEST_NAME
    _update_json(manifest, lambda m: [m[section].update(fields) for section, fields in changes.items()])
    pointer = out / "corpus" / "CURRENT"
    generation = out / "corpus" / pointer.read_text().split()[0] / "generation.json"
    _update_json(generation, lambda g: g.update(manifest_sha256=sha256_file(manifest)))
    pointer.write_text(f"{generation.parent.name} {sha256_file(generation)}\n")
    return out


def _update_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
