import json

import numpy as np
import pytest

from ragrt.bundle.reader import Bundle
from ragrt.errors import BundleError
from ragrt.bundle.versions import CORPUS_DIR, POINTER, publish, staging
from ragrt.bundle.integrity import sha256_file
from ragrt.bundle.manifest import (PACKED_IO, SCHEMA, SCHEMA_VERSION, ChunkingSpec, EncoderSpec, FileEntry, GeneratorIO,
                             GeneratorSpec, IndexSpec,
                             Manifest, PassagesSpec, PromptSpec, Source, read_manifest)
from ragrt.decoding.prompt import fill
from ragrt.export.pack import model_file_entries, write_manifest


def sample_manifest(files=None) -> Manifest:
    src = Source("tiny", "0" * 64)
    return Manifest(
        schema=SCHEMA, schema_version=SCHEMA_VERSION, ragrt_version="0.1.0", created_at="2026-01-01T00:00:00+00:00",
        files=files or {},
        encoder=EncoderSpec("encoder/model.onnx", "encoder/tokenizer.json", 8, 32, "embedding", "fp32", src),
        generator=GeneratorSpec("generator/model.onnx", "generator/tokenizer.json", "fp32", 2, 1, 4, 16, (2,), 2, 64, src),
        prompt=PromptSpec("<s>{system}|{user}>", "sys", "{context}?{question}", "[{n}] {title} {text}"),
        chunking=ChunkingSpec(128, 32),
    )


def test_round_trip_is_stable_and_sorted():
    m = sample_manifest({"a": FileEntry("ab" * 32, 3)})
    text = m.to_json()
    again = Manifest.from_json(text)
    assert again == m
    assert again.to_json() == text
    keys = list(json.loads(text))
    assert keys == sorted(keys)


def test_newer_schema_is_refused():
    raw = json.loads(sample_manifest().to_json())
    raw["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(BundleError, match="newer than this ragrt reads"):
        Manifest.from_json(json.dumps(raw))
    raw["schema_version"] = 1
    with pytest.raises(BundleError, match="predates corpus generations; rebuild it"):
        Manifest.from_json(json.dumps(raw))


def test_row_lengths_reach_a_packed_graph_as_lengths_or_as_a_mask():
    lengths = np.array([2, 4])
    feed = PACKED_IO.length_feed(lengths)
    assert feed["seqlens_k"].dtype == np.int32 and feed["seqlens_k"].tolist() == [1, 3]
    assert feed["total_sequence_length"].shape == () and int(feed["total_sequence_length"]) == 4
    # Version-2 packed bundles take the mask their graph derives the same two numbers from.
    (mask,) = GeneratorIO().length_feed(lengths).values()
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


def test_version_2_manifests_still_open():
    raw = json.loads(sample_manifest().to_json())
    raw["schema_version"] = 2
    for key in ("seqlens_k", "total_sequence_length"):
        del raw["generator"]["io"][key]
    assert Manifest.from_json(json.dumps(raw)).generator.io == GeneratorIO()


@pytest.mark.parametrize("path", ["../etc/passwd", "/etc/passwd", "a/../../b", "C:\\x", ""])
def test_paths_outside_the_bundle_are_refused(path):
    raw = json.loads(sample_manifest().to_json())
    raw["encoder"]["model"] = path
    with pytest.raises(BundleError, match="outside the bundle"):
        Manifest.from_json(json.dumps(raw))


def test_wrong_types_and_missing_fields_are_named():
    raw = json.loads(sample_manifest().to_json())
    raw["generator"]["num_layers"] = "two"
    with pytest.raises(BundleError, match="num_layers: expected int"):
        Manifest.from_json(json.dumps(raw))
    raw["generator"]["num_layers"] = 2
    del raw["chunking"]
    with pytest.raises(BundleError, match="missing field 'chunking'"):
        Manifest.from_json(json.dumps(raw))
    with pytest.raises(BundleError, match="not valid JSON"):
        Manifest.from_json("{")


def _write_bundle(root):
    for rel in sample_manifest().referenced_paths():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(rel.encode() * 3)
    write_manifest(root, sample_manifest(model_file_entries(root)))
    (root / CORPUS_DIR).mkdir()
    with staging(root) as gen:
        for name in ("v.usearch", "d.bin", "o.npy"):
            (gen / name).write_bytes(name.encode() * 3)
        publish(root, gen, number=1, manifest_sha256=sha256_file(root / "manifest.json"), documents=3,
                index=IndexSpec("v.usearch", "cos", "f16", 8, 3, 16, 64), passages=PassagesSpec("d.bin", "o.npy", 3))


@pytest.mark.parametrize("rel", ["encoder/model.onnx", "corpus/gen-000001/v.usearch"])
def test_bundle_open_checks_sizes_and_verify_checks_hashes(tmp_path, rel):
    _write_bundle(tmp_path)
    Bundle.open(tmp_path, verify=True)
    target = tmp_path / rel
    data = bytearray(target.read_bytes())
    data[5] ^= 0x01                     # same size, one bit flipped
    target.write_bytes(bytes(data))
    if rel.startswith("corpus/"):       # the corpus is hashed at every open
        with pytest.raises(BundleError, match=f"{rel}: sha256 does not match"):
            Bundle.open(tmp_path)
    else:
        Bundle.open(tmp_path)           # sizes still match
    with pytest.raises(BundleError, match=f"{rel}: sha256 does not match"):
        Bundle.open(tmp_path, verify=True)
    target.write_bytes(bytes(data[:-1]))
    with pytest.raises(BundleError, match=f"{rel}: size"):
        Bundle.open(tmp_path)
    target.unlink()
    with pytest.raises(BundleError, match=f"{rel}: missing"):
        Bundle.open(tmp_path)


def test_the_json_files_are_checked_at_every_open(tmp_path):
    _write_bundle(tmp_path)
    manifest = tmp_path / "manifest.json"
    text = manifest.read_text()
    manifest.write_text(text.replace('"created_at": "2026', '"created_at": "2027'))   # still a valid manifest
    with pytest.raises(BundleError, match="manifest.json: sha256 does not match the one .*generation.json"):
        Bundle.open(tmp_path)
    manifest.write_text(text)
    generation = tmp_path / "corpus/gen-000001/generation.json"
    generation.write_text(generation.read_text().replace('"documents": 3', '"documents": 4'))
    with pytest.raises(BundleError, match="generation.json: sha256 does not match corpus/CURRENT"):
        Bundle.open(tmp_path)


@pytest.mark.parametrize("rel", ["encoder/model.onnx", "corpus/gen-000001", "corpus/gen-000001/d.bin"])
def test_a_link_out_of_the_bundle_is_refused(tmp_path, rel):
    bundle = tmp_path / "b"
    bundle.mkdir()
    _write_bundle(bundle)
    outside = tmp_path / "outside"
    (bundle / rel).rename(outside)              # same bytes, so only where they live is wrong
    (bundle / rel).symlink_to(outside)
    with pytest.raises(BundleError, match="a link to .*outside(/generation.json)?, outside the bundle"):
        Bundle.open(bundle)


@pytest.mark.parametrize("pointer", ["gen-000001", "gen-000002 " + "0" * 64 + "\n", "../../x " + "0" * 64 + "\n"])
def test_a_bad_pointer_is_refused(tmp_path, pointer):
    _write_bundle(tmp_path)
    (tmp_path / CORPUS_DIR / POINTER).write_text(pointer)
    with pytest.raises(BundleError, match="CURRENT|gen-000002"):
        Bundle.open(tmp_path)


def test_missing_bundle_and_manifest(tmp_path):
    with pytest.raises(BundleError, match="no such bundle directory"):
        read_manifest(tmp_path / "nope")
    with pytest.raises(BundleError, match="manifest.json: missing"):
        read_manifest(tmp_path)


def test_fill_is_one_pass():
    assert fill("{a}-{b}", a="{b}", b="x") == "{b}-x"
    assert fill("{unknown} {a}", a="1") == "{unknown} 1"


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    from ragrt.bundle.atomic import atomic_open, atomic_write_text
    target = tmp_path / "f.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_open(target) as f:
            f.write("half")
            raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]
