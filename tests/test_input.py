"""Hostile questions and corpus files: handled with a result, a warning or a one-line error."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ragrt import Engine
from ragrt.corpus.documents import read_documents
from ragrt.errors import CorpusError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def engine(tiny_bundle):
    return Engine.open(tiny_bundle, threads=1)


def test_an_overlong_question_is_cut_with_a_warning(engine):
    ans = engine.ask("How do I copy a list? " * 2000, k=2, max_new_tokens=4)
    assert ans.warnings == ["the question or passages were truncated to fit the context window"]
    assert ans.prompt_tokens <= engine.manifest.generator.max_context - 4
    assert engine.ask("How do I copy a list?", k=2, max_new_tokens=4).warnings == []


def test_nul_and_control_characters_are_dropped(engine):
    clean = engine.ask("What is the GIL?", k=3, max_new_tokens=4)
    dirty = engine.ask("\x00What\x1b is\x07 the\x7f GIL?\ud800", k=3, max_new_tokens=4)
    assert [s.id for s in dirty.sources] == [s.id for s in clean.sources]
    assert dirty.answer == clean.answer


def test_invalid_utf8_on_the_command_line(tiny_bundle):
    def ask(question: bytes):
        return subprocess.run([sys.executable.encode(), b"-m", b"ragrt", b"ask", b"--bundle",
                               str(tiny_bundle).encode(), b"--max-new-tokens", b"2", question],
                              cwd=ROOT, capture_output=True, timeout=300)
    assert ask(b"copy a \xff\xfe list?").returncode == 0
    out = ask(b"\xff\xfe\x01")
    assert out.returncode == 2 and out.stderr.decode().strip() == "ragrt: error: the question is empty"


def test_corpus_text_that_is_not_unicode_is_replaced_not_fatal(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"id": "a", "text": "caf\xe9 ok"}\n' + json.dumps({"id": "b\ud800", "text": "x\udfff"}).encode()
                     + b"\n")
    docs = list(read_documents(path))
    assert [(d.id, d.text) for d in docs] == [("a", "caf\ufffd ok"), ("b\ufffd", "x\ufffd")]


def test_corpus_errors_name_file_and_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"id": "a", "text": "x"}\n\n[1]\n')
    with pytest.raises(CorpusError, match=r"c\.jsonl:3: expected a JSON object"):
        list(read_documents(path))
    path.write_text('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n')
    with pytest.raises(CorpusError, match=r"c\.jsonl:2: duplicate id 'a' \(first seen at .*c\.jsonl:1\)"):
        list(read_documents(path))
