"""A corrupted bundle, file kind by file kind: `Engine.open` (no verify) refuses it with an error naming
the file, or, for a model whose bytes still parse, `ragrt verify` does. Never a crash."""
import random
import shutil
from pathlib import Path

import pytest

from ragrt import Engine
from ragrt.bundle.reader import Bundle
from ragrt.errors import BundleError

KINDS = {
    "manifest.json": "manifest",
    "encoder/model.onnx": "encoder graph",
    "encoder/tokenizer.json": "encoder tokenizer",
    "generator/model.onnx": "generator graph",
    "generator/model.onnx.data": "generator weights",
    "generator/step.onnx": "generator step graph",
    "generator/assemble.onnx": "generator assembly graph",
    "generator/kv_scales.npy": "int8 cache scales",
    "generator/tokenizer.json": "generator tokenizer",
    "corpus/CURRENT": "corpus pointer",
    "corpus/gen-000001/generation.json": "generation",
    "corpus/gen-000001/vectors.usearch": "index",
    "corpus/gen-000001/passages.bin": "passage data",
    "corpus/gen-000001/offsets.npy": "passage offsets",
    "corpus/gen-000001/bm25/data.csc.index.npy": "bm25 scores",
    "corpus/gen-000001/bm25/indices.csc.index.npy": "bm25 rows",
    "corpus/gen-000001/bm25/indptr.csc.index.npy": "bm25 word offsets",
    "corpus/gen-000001/bm25/params.index.json": "bm25 parameters",
    "corpus/gen-000001/bm25/vocab.index.json": "bm25 vocabulary",
}


def damage(path: Path, how: str, rng: random.Random) -> None:
    data = path.read_bytes()
    if how == "missing":
        path.unlink()
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":                              # same size, so only content checks can notice
        path.write_bytes(bytes(rng.randrange(256) for _ in range(len(data))))
    else:                                               # one byte flipped, somewhere inside
        flipped = bytearray(data)
        flipped[rng.randrange(len(data))] ^= 0xFF
        path.write_bytes(bytes(flipped))


def test_every_file_kind_is_listed(tiny_bundle):
    assert sorted(p.relative_to(tiny_bundle).as_posix() for p in tiny_bundle.rglob("*") if p.is_file()) == sorted(KINDS)


@pytest.mark.parametrize("how", ["missing", "truncated", "garbage", "flipped"])
@pytest.mark.parametrize("rel", list(KINDS), ids=list(KINDS.values()))
def test_a_damaged_file_is_named(tiny_bundle, tmp_path, rel, how):
    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "b"))
    damage(bundle / rel, how, random.Random(f"{rel}{how}"))
    name = Path(rel).name
    with pytest.raises(BundleError, match=name.replace(".", r"\.")):
        Bundle.open(bundle, verify=True)
    try:
        engine = Engine.open(bundle, threads=1)
    except BundleError as e:
        assert name in str(e) or (name == "CURRENT" and "generation.json" in str(e)), str(e)
    else:
        # Only a model file with a flipped byte (a graph's, the weights' or the scales') can still load,
        # or a weights file of garbage: weights are numbers either way. Open checks model sizes only
        # (hashing them is `verify`'s job, asserted above).
        assert (how == "flipped" and rel.endswith((".onnx", ".data", ".npy"))) or (
            how == "garbage" and rel.endswith(".data")), f"{rel} {how}: opened without an error"
        engine.ask("How do I copy a list?", k=2, max_new_tokens=2)
