import os
import sys
from pathlib import Path

import pytest

# Tests never reach a model hub; anything that tries must fail loudly instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def tiny_generator_dir(tmp_path_factory) -> Path:
    from tiny import make_generator
    return make_generator(tmp_path_factory.mktemp("tiny-generator"))


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory) -> Path:
    from tiny import make_encoder
    return make_encoder(tmp_path_factory.mktemp("tiny-encoder"))


@pytest.fixture(scope="session")
def tiny_generator_onnx(tiny_generator_dir, tmp_path_factory):
    """(dir holding model.onnx and tokenizer.json, GeneratorExport)."""
    from ragrt.export.onnx.graphs import export_generator
    out = tmp_path_factory.mktemp("tiny-generator-onnx")
    return out, export_generator(tiny_generator_dir, out)


@pytest.fixture(scope="session")
def tiny_fused_fp32(tiny_generator_dir, tmp_path_factory):
    """(model.onnx path, GeneratorSpec) of the tiny llama as onnxruntime-genai's fused fp32 graph."""
    pytest.importorskip("onnxruntime_genai")
    from dataclasses import asdict, replace

    from ragrt.bundle.manifest import ModelSource
    from ragrt.export.onnx.graphs import export_generator_fused
    from ragrt.export.pipeline import generator_spec
    exp = export_generator_fused(tiny_generator_dir, tmp_path_factory.mktemp("tiny-fused") / "fp32", "fp32")
    meta = {k: v for k, v in asdict(exp).items() if k not in ("model", "tokenizer")}
    # fp32 kernels round alike in every batch shape; the tests check that claim token by token.
    return exp.model, replace(generator_spec(meta, "", "fp32", 512, ModelSource("tiny", ""), "fused"), batch_invariant=True,
                                  prefix_exact=True, drafts_exact=True)


TINY_CORPUS = [
    {"id": "lists", "title": "Lists", "text": "Use list.copy() or a slice a[:] to copy a list. Lists are mutable sequences."},
    {"id": "json", "title": "JSON", "text": "The json module parses JSON documents with json.loads and json.load."},
    {"id": "gil", "title": "GIL", "text": "The GIL lets one thread run Python bytecode at a time."},
    {"id": "files", "title": "Files", "text": "open() returns a file object; use a with statement so it is closed."},
    {"id": "gen", "title": "Generators", "text": "Generators yield values lazily, one at a time, when iterated."},
]


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    import json
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in TINY_CORPUS))
    return path


@pytest.fixture(scope="session")
def tiny_bundle(tiny_corpus, tiny_encoder_dir, tiny_generator_dir, tmp_path_factory) -> Path:
    """A whole bundle from the tiny models, through the real export pipeline. With the int8 step graph
    asked for, not left to `auto`: random weights sit near auto's agreement floor, and the tests list
    the bundle's files."""
    from ragrt.export.pipeline import ExportConfig, run_export
    out = tmp_path_factory.mktemp("bundles") / "tiny"
    return run_export(ExportConfig(corpus=tiny_corpus, out=out, encoder=tiny_encoder_dir, generator=tiny_generator_dir,
                                   quantize="fp32", parity_prompts=3, max_context=512, kv_cache="int8"))
