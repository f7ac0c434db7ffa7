import dataclasses
import json
import re

import numpy as np
import pytest

from ragrt.bundle.reader import Bundle
from ragrt.errors import BundleError
from ragrt.bundle.versions import CORPUS_DIR, POINTER, publish, staging
from ragrt.bundle.integrity import sha256_file
from ragrt.bundle.manifest import (PACKED_IO, SCHEMA, SCHEMA_VERSION, ChunkingSpec, CorpusProvenance, EncoderParity,
                                   EncoderSpec, FileEntry, GeneratorIO, GeneratorSpec, GreedyAgreement, IndexSpec, Manifest,
                                   ModelSource, ParityReport, PassagesSpec, PromptSpec, read_manifest)
from ragrt.decoding.packed import length_feed
from ragrt.decoding.prompt import fill
from ragrt.export.pack import model_file_entries, write_manifest


def sample_manifest(files=None) -> Manifest:
    src = ModelSource("tiny", "0" * 64)
    agreement = GreedyAgreement(exact_match=1.0, prefix_agreement=1.0, teacher_forced_top1=1.0, prompts=3, new_tokens=8,
                                sample="Use a[:].", batch_invariant=True)
    return Manifest(
        schema=SCHEMA, schema_version=SCHEMA_VERSION, ragrt_version="0.1.0", created_at="2026-01-01T00:00:00+00:00",
        files=files or {},
        encoder=EncoderSpec("encoder/model.onnx", "encoder/tokenizer.json", 8, 32, "embedding", "fp32", src),
        generator=GeneratorSpec("generator/model.onnx", "generator/tokenizer.json", "fp32", 2, 1, 4, 16, (2,), 2, 64, src),
        prompt=PromptSpec("<s>{system}|{user}>", "sys", "{context}?{question}", "[{n}] {title} {text}"),
        chunking=ChunkingSpec(128, 32),
        corpus=CorpusProvenance(source="corpus.jsonl", documents=3, passages=5, embedded_with="fp32"),
        parity=ParityReport(encoder=EncoderParity(fp32_cosine_mean=1.0, fp32_cosine_min=1.0, int8_cosine_mean=0.995,
                                                  int8_cosine_min=0.99, texts=6, w8a8_cosine_mean=0.99,
                                                  w8a8_cosine_min=0.98),
                            generator={"fp32": agreement}, used="fp32"),
    )


def version_2_manifest(files=None) -> Manifest:
    """The sample as a version-2 writer wrote it: before the row-length inputs, `corpus.embedded_with`,
    the w8a8 encoder and the exactness flags."""
    raw = json.loads(sample_manifest(files).to_json())
    raw["schema_version"] = 2
    for key in ("seqlens_k", "total_sequence_length"):
        del raw["generator"]["io"][key]
    del raw["corpus"]["embedded_with"]
    for key in ("w8a8_cosine_mean", "w8a8_cosine_min"):
        del raw["parity"]["encoder"][key]
    for key in ("batch_invariant", "prefix_exact", "drafts_exact"):
        del raw["parity"]["generator"]["fp32"][key]
    return Manifest.from_json(json.dumps(raw))


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
    feed = length_feed(PACKED_IO, lengths)
    assert feed["seqlens_k"].dtype == np.int32 and feed["seqlens_k"].tolist() == [1, 3]
    assert feed["total_sequence_length"].shape == () and int(feed["total_sequence_length"]) == 4
    # Version-2 packed bundles take the mask their graph derives the same two numbers from.
    (mask,) = length_feed(GeneratorIO(), lengths).values()
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


def test_version_2_manifests_still_open():
    raw = json.loads(sample_manifest().to_json())
    raw["schema_version"] = 2
    for key in ("seqlens_k", "total_sequence_length"):
        del raw["generator"]["io"][key]
    assert Manifest.from_json(json.dumps(raw)).generator.io == GeneratorIO()


def test_corpus_and_parity_keep_the_json_older_bundles_have():
    raw = json.loads(sample_manifest().to_json())
    assert raw["corpus"] == {"source": "corpus.jsonl", "documents": 3, "passages": 5, "embedded_with": "fp32"}
    # Fields only get added: what older bundles wrote is all still there, and what they lack reads as None.
    assert set(raw["parity"]) == {"encoder", "generator", "used", "passage_kv", "drafts", "decoding", "kv_cache",
                                  "answer_modes"}
    assert raw["parity"]["used"] == "fp32"
    del raw["parity"]["passage_kv"], raw["parity"]["drafts"], raw["parity"]["decoding"], raw["parity"]["kv_cache"]
    del raw["generator"]["kv_scales"]
    m = Manifest.from_json(json.dumps(raw))
    parity = m.parity
    assert parity.passage_kv is None and parity.drafts is None and parity.decoding == {} and parity.kv_cache is None
    assert m.generator.kv_scales == ""
    assert set(raw["parity"]["encoder"]) == {"fp32_cosine_mean", "fp32_cosine_min", "int8_cosine_mean", "int8_cosine_min",
                                             "w8a8_cosine_mean", "w8a8_cosine_min", "texts"}
    assert set(raw["parity"]["generator"]["fp32"]) == {"exact_match", "prefix_agreement", "teacher_forced_top1", "prompts",
                                                       "new_tokens", "sample", "batch_invariant", "prefix_exact",
                                                       "drafts_exact"}


def test_fields_added_since_version_2_read_as_not_recorded():
    m = version_2_manifest()
    assert m.corpus == CorpusProvenance(source="corpus.jsonl", documents=3, passages=5, embedded_with=None)
    assert m.parity.encoder.w8a8_cosine_mean is None and m.parity.encoder.w8a8_cosine_min is None
    assert m.parity.encoder.int8_cosine_min == 0.99
    assert not m.parity.generator["fp32"].batch_invariant and m.parity.generator["fp32"].sample == "Use a[:]."


@pytest.mark.parametrize("keys,value,message", [
    (("corpus", "documents"), "3", "corpus:documents: expected int, got str"),
    (("corpus", "embedded_with"), 32, "corpus:embedded_with: expected str, got int"),
    (("parity", "encoder", "w8a8_cosine_min"), "high", "parity:encoder:w8a8_cosine_min: expected float"),
    (("parity", "generator", "fp32", "exact_match"), [1.0], "parity:generator.fp32:exact_match: expected float"),
    (("parity", "generator", "fp32"), 1.0, "parity:generator.fp32: expected an object for GreedyAgreement"),
    (("parity", "used"), None, "parity:used: expected str, got NoneType")])
def test_a_bad_corpus_or_parity_is_named(keys, value, message):
    raw = json.loads(sample_manifest().to_json())
    *parents, last = keys
    node = raw
    for key in parents:
        node = node[key]
    node[last] = value
    with pytest.raises(BundleError, match=re.escape(message)):
        Manifest.from_json(json.dumps(raw))
    del node[last]
    if last in ("documents", "used"):
        with pytest.raises(BundleError, match=f"missing field '{last}'"):
            Manifest.from_json(json.dumps(raw))


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


def _write_bundle(root, manifest=sample_manifest):
    for rel in manifest().referenced_paths():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(rel.encode() * 3)
    write_manifest(root, manifest(model_file_entries(root)))
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


@pytest.mark.parametrize("manifest", [sample_manifest, version_2_manifest])
def test_info_shows_where_the_corpus_came_from_and_the_parity(tmp_path, capsys, manifest):
    from ragrt.cli import main
    _write_bundle(tmp_path, manifest)
    assert main(["info", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    w8a8 = ", w8a8_cosine_mean 0.9900, w8a8_cosine_min 0.9800" if manifest is sample_manifest else ""
    assert "  built from  corpus.jsonl: 3 documents -> 5 passages of 128 tokens, overlap 32" in lines
    assert ("  parity      encoder vs PyTorch: fp32_cosine_mean 1.0000, fp32_cosine_min 1.0000, int8_cosine_mean 0.9950, "
            f"int8_cosine_min 0.9900{w8a8}") in lines
    assert ("  parity      generator fp32 vs PyTorch: exact_match 1.000, prefix_agreement 1.000, "
            "teacher_forced_top1 1.000") in lines
    assert "  parity      this bundle holds the fp32 generator" in lines


ENCODER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _encoder_graph(path, inputs):
    """A graph taking `inputs` whose embedding is [sum of the unpadded ids, sum of the token types]
    (token types are a constant zero when it does not take them)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper
    derived = [] if "token_type_ids" in inputs else [helper.make_node("Mul", ["input_ids", "zero"], ["token_type_ids"])]
    nodes = derived + [helper.make_node("Mul", ["input_ids", "attention_mask"], ["kept"]),
                       helper.make_node("Cast", ["kept"], ["kept_f"], to=TensorProto.FLOAT),
                       helper.make_node("Cast", ["token_type_ids"], ["types_f"], to=TensorProto.FLOAT),
                       helper.make_node("ReduceSum", ["kept_f", "axis"], ["id_sum"], keepdims=1),
                       helper.make_node("ReduceSum", ["types_f", "axis"], ["type_sum"], keepdims=1),
                       helper.make_node("Concat", ["id_sum", "type_sum"], ["embedding"], axis=1)]
    graph = helper.make_graph(
        nodes, "encoder", [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"]) for n in inputs],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 2])],
        initializer=[helper.make_tensor("axis", TensorProto.INT64, [1], [1]),
                     helper.make_tensor("zero", TensorProto.INT64, [], [0])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path / "encoder.onnx"))


def _word_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))


@pytest.mark.parametrize("inputs", [ENCODER_INPUTS[:2], ENCODER_INPUTS])
def test_the_encoder_feeds_exactly_the_inputs_the_manifest_names(tmp_path, inputs):
    from ragrt.retrieval.encoder import TextEncoder
    from ragrt.runtime.sessions import SessionConfig
    _encoder_graph(tmp_path, inputs)
    _word_tokenizer(tmp_path)
    spec = EncoderSpec("encoder.onnx", "tokenizer.json", 2, 8, "embedding", "fp32", ModelSource("tiny", ""), inputs)
    config = SessionConfig(device="cpu", threads=1, huge_pages=False)
    encoder = TextEncoder.from_spec(tmp_path, spec, config)
    # Rows are padded to the longest; the mask keeps the padding out and the token types are zeros.
    np.testing.assert_array_equal(encoder.embed_all(["a b b", "b", "a"]), [[5, 0], [2, 0], [1, 0]])
    other = ENCODER_INPUTS[:2] if inputs == ENCODER_INPUTS else ENCODER_INPUTS
    with pytest.raises(BundleError, match=f"encoder graph takes input\\(s\\) {', '.join(sorted(inputs))}, the manifest "
                                          f"names {', '.join(other)}; re-export the bundle"):
        TextEncoder.from_spec(tmp_path, dataclasses.replace(spec, inputs=other), config)
    with pytest.raises(BundleError, match="encoder inputs must be input_ids, attention_mask and optionally "
                                          "token_type_ids; the manifest names input_ids, position_ids"):
        TextEncoder.from_spec(tmp_path, dataclasses.replace(spec, inputs=("input_ids", "position_ids")), config)


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
