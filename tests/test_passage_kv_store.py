"""The passage KV store (`ragrt export --passage-kv all`): every block precomputed into the corpus
generation, kept in step by `ragrt index add/remove`, and read by the engine instead of computing."""
import json
import logging
import os
import shutil
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest

from ragrt import Engine
from ragrt.bundle.reader import Bundle
from ragrt.bundle.versions import PASSAGE_KV_FILE, PASSAGE_KV_INDEX
from ragrt.corpus.update import add_documents, remove_ids
from ragrt.decoding.blocks import BlockStats, PassageKV
from ragrt.decoding.blockstore import BlockStore, LiveBlockStore, graph_id, has_store, qa_builder
from ragrt.errors import UserInputError
from ragrt.retrieval.passages import Passage, PassageStore
import faults

pytest.importorskip("onnxruntime_genai")

NEW_DOCS = [
    {"id": "tuple", "title": "Tuples", "text": "A tuple is an immutable sequence. " * 30},
    {"id": "dict", "title": "Dicts", "text": "dict.fromkeys removes duplicates in order."},
]
QUESTIONS = ("How do I copy a list?", "What does the GIL do?", "How are files closed?")


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def kv_bundle(tiny_corpus, tiny_encoder_dir, tiny_generator_dir, tmp_path_factory) -> Path:
    from ragrt.export.pipeline import ExportConfig, run_export
    return run_export(ExportConfig(corpus=tiny_corpus, out=tmp_path_factory.mktemp("kv") / "bundle",
                                   encoder=tiny_encoder_dir, generator=tiny_generator_dir, quantize="fp32",
                                   parity_prompts=3, max_context=512, graph="fused", passage_kv="all"))


@pytest.fixture
def bundle(kv_bundle, tmp_path) -> Path:
    return Path(shutil.copytree(kv_bundle, tmp_path / "bundle"))


def generation_passages(bundle: Path) -> list[Passage]:
    gen = Bundle.open(bundle).generation
    store = PassageStore.open(gen.path, gen.spec.passages)
    return [store.get(i) for i in range(len(store))]


def block_keys(engine: Engine, passages) -> dict[str, bytes]:
    """{passage id: its block's key}, as a question's prompt would key it."""
    builder = qa_builder(engine.manifest, engine.tokenizer)
    prefix = builder.build_blocks("", [])[0].prefix
    return {p.id: engine.passage_kv.key(prefix, builder.build_blocks("", [p])[0].blocks[0]) for p in passages}


def current_store(bundle: Path) -> BlockStore:
    return BlockStore.open(Bundle.open(bundle).generation.path)


def test_export_stores_every_passage_and_the_engine_computes_none(kv_bundle, capsys):
    from ragrt.cli import build_parser, main
    args = build_parser().parse_args(["export", "--corpus", "c", "--out", "o", "--passage-kv", "all"])
    assert args.passage_kv == "all"
    assert main(["info", str(kv_bundle)]) == 0
    assert f"kv store    {os.path.getsize(Bundle.open(kv_bundle).generation.file(PASSAGE_KV_FILE)) / 1e6:.1f} MB" \
        in capsys.readouterr().out
    engine = Engine.open(kv_bundle, threads=1)
    passages = generation_passages(kv_bundle)
    store = current_store(kv_bundle)
    assert has_store(engine.corpus.generation) and isinstance(engine.passage_kv.store, LiveBlockStore)
    assert set(block_keys(engine, passages).values()) == store.keys() and len(store) == len(passages)
    m = engine.manifest.generator
    assert store.nbytes == store.tokens * 2 * m.num_layers * m.num_kv_heads * m.head_dim * 2     # float16
    for q in QUESTIONS:
        answer = engine.ask(q, k=3, passage_kv="on", max_new_tokens=8)
        assert answer.passage_kv == {"reused": 3, "computed": 0}


def test_stored_blocks_answer_as_computed_ones(kv_bundle):
    """Blocks from the store and blocks computed at question time (lazy) give identical logits:
    both are float16, and float16 blocks stay within 0.2% of the float32 computation."""
    engine = Engine.open(kv_bundle, threads=1)
    stored = engine.passage_kv
    builder = qa_builder(engine.manifest, engine.tokenizer)
    for q in QUESTIONS:
        prompt, _ = builder.build_blocks(q, engine.retrieve(q, k=3))
        got_stats, want_stats = BlockStats(), BlockStats()
        got, _ = stored.prefill([prompt], got_stats)
        want, _ = PassageKV(engine.decoder, stored.graph_id, repair=stored.repair).prefill([prompt], want_stats)
        assert (got_stats.computed, want_stats.computed) == (0, 3)
        # Every block is stored and the prefix computed: the prefill runs the tail and the repairs.
        assert stored.prefill_cost(prompt) == len(prompt.tail) + sum(min(stored.repair, len(b)) for b in prompt.blocks[1:])
        np.testing.assert_array_equal(got, want)
        ids = prompt.blocks[0]
        exact = stored.compute(prompt.prefix, ids)
        assert np.abs(stored.block(prompt.prefix, ids, BlockStats()) - exact).max() <= 2e-3 * np.abs(exact).max()
    # Whole answers: the store's engine and one that computes every block.
    lazy_engine = Engine.open(kv_bundle, threads=1)
    lazy_engine.passage_kv.store = None
    computed = 0
    for q in QUESTIONS:
        a, b = (e.ask(q, k=3, passage_kv="on", max_new_tokens=12) for e in (engine, lazy_engine))
        assert a.answer == b.answer and a.new_tokens == b.new_tokens and a.passage_kv["computed"] == 0
        computed += b.passage_kv["computed"]
    assert computed >= 3


def test_index_add_and_remove_keep_the_store_in_step(bundle, tmp_path):
    engine = Engine.open(bundle, threads=1)       # stays open across the updates
    before = os.path.getsize(Bundle.open(bundle).generation.file(PASSAGE_KV_FILE))
    add_documents(bundle, write_jsonl(tmp_path / "new.jsonl", NEW_DOCS), threads=1)
    passages = generation_passages(bundle)
    keys = block_keys(engine, passages)
    assert set(keys.values()) == current_store(bundle).keys()
    assert any(p.startswith("tuple#") for p in keys) and os.path.getsize(
        Bundle.open(bundle).generation.file(PASSAGE_KV_FILE)) > before
    answer = engine.ask("dict.fromkeys removes duplicates in order.", k=1, passage_kv="on", max_new_tokens=4)
    assert answer.sources[0].id == "dict#0" and answer.passage_kv == {"reused": 1, "computed": 0}

    remove_ids(bundle, write_jsonl_lines(tmp_path / "ids.txt", ["tuple", "dict"]))
    assert current_store(bundle).keys() == set(block_keys(engine, generation_passages(bundle)).values())
    assert os.path.getsize(Bundle.open(bundle).generation.file(PASSAGE_KV_FILE)) == before     # removed ones dropped


def test_a_changed_passage_gets_new_kv_never_the_old(bundle, tmp_path):
    engine = Engine.open(bundle, threads=1)
    old_key = block_keys(engine, [p for p in generation_passages(bundle) if p.id == "gil#0"])["gil#0"]
    remove_ids(bundle, write_jsonl_lines(tmp_path / "ids.txt", ["gil"]))
    changed = {"id": "gil", "title": "GIL", "text": "The GIL is gone in free-threaded builds of Python."}
    add_documents(bundle, write_jsonl(tmp_path / "gil.jsonl", [changed]), threads=1)
    [new] = [p for p in generation_passages(bundle) if p.id == "gil#0"]
    new_key = block_keys(engine, [new])["gil#0"]
    store = current_store(bundle)
    assert new_key != old_key and store.get(old_key) is None and store.get(new_key) is not None
    # The open engine serves the new generation's block, equal to computing it afresh.
    builder = qa_builder(engine.manifest, engine.tokenizer)
    prefix, (ids,) = builder.build_blocks("", [new])[0].prefix, builder.build_blocks("", [new])[0].blocks
    np.testing.assert_allclose(engine.passage_kv.store.get(new_key), engine.passage_kv.compute(prefix, ids), atol=1e-2)
    answer = engine.ask("free-threaded builds", k=1, passage_kv="on", max_new_tokens=4)
    assert answer.sources[0].text == changed["text"] and answer.passage_kv == {"reused": 1, "computed": 0}


def test_a_failed_update_leaves_the_old_store_or_the_new(bundle, tmp_path, monkeypatch):
    """Fails the k-th fsync or rename of an `index add`, for every k (as tests/test_update.py does):
    the generation is the old or the new one, and its store holds exactly its passages' blocks."""
    new_docs = write_jsonl(tmp_path / "new.jsonl", NEW_DOCS)
    engine = Engine.open(bundle, threads=1)
    old = {p.id for p in generation_passages(bundle)}
    _, _, runs = faults.failed_updates(monkeypatch, bundle, tmp_path, lambda b: add_documents(b, new_docs, threads=1))
    seen = set()
    for k, b in runs:
        Bundle.open(b, verify=True)                    # the store's data hashed too
        passages = generation_passages(b)
        seen.add("old" if {p.id for p in passages} == old else "new")
        assert current_store(b).keys() == set(block_keys(engine, passages).values()), k
    assert seen == {"old", "new"}


def test_a_store_larger_than_the_free_disk_is_refused(kv_bundle, tiny_corpus, tiny_encoder_dir, tiny_generator_dir,
                                                       tmp_path, monkeypatch):
    from ragrt.export.pipeline import ExportConfig, run_export
    with pytest.raises(UserInputError, match="--passage-kv all needs the fused generator graph"):
        run_export(ExportConfig(corpus=tiny_corpus, out=tmp_path / "optimum", graph="optimum", passage_kv="all"))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 20, 1 << 20, 1000))
    out = tmp_path / "full"
    with pytest.raises(UserInputError, match=r"needs 0\.\d+ GB and .* has 0\.00 GB free; .* --passage-kv lazy"):
        run_export(ExportConfig(corpus=tiny_corpus, out=out, encoder=tiny_encoder_dir, generator=tiny_generator_dir,
                                quantize="fp32", parity_prompts=3, max_context=512, passage_kv="all"))
    assert not out.exists()
    bundle = Path(shutil.copytree(kv_bundle, tmp_path / "bundle"))
    with pytest.raises(UserInputError, match="GB free"):
        add_documents(bundle, write_jsonl(tmp_path / "new.jsonl", NEW_DOCS), threads=1)
    assert Bundle.open(bundle).generation.name == "gen-000001"


def test_a_store_for_another_graph_is_not_used(kv_bundle, caplog):
    gen = Bundle.open(kv_bundle).generation
    store = current_store(kv_bundle)
    live = LiveBlockStore(lambda: gen, graph_id="another graph", prefix=store.prefix, dtype=np.float32)
    with caplog.at_level(logging.WARNING, logger="ragrt"):
        assert live.get(next(iter(store.keys()))) is None
    assert "another generator graph or prompt" in caplog.text
    right = LiveBlockStore(lambda: gen, graph_id=store.graph_id, prefix=store.prefix, dtype=np.float32)
    assert right.get(next(iter(store.keys()))).dtype == np.float32
    assert PASSAGE_KV_INDEX in gen.spec.files and store.graph_id == graph_id(Bundle.open(kv_bundle).manifest)


def write_jsonl_lines(path: Path, lines) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines))
    return path
