import json

import pytest
from tokenizers import Tokenizer

from engine.errors import CorpusError, UserInputError
from export.corpus import Document, chunk_documents, read_documents
from export.pydocs import PYDOCS_SOURCES, clean_rst, python_docs_documents, split_sections, write_python_docs_corpus


def write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_documents(tmp_path):
    p = write_jsonl(tmp_path / "c.jsonl", ['{"id": "a", "text": "alpha", "title": "A"}', "",
                                            '{"id": 7, "text": "seven"}'])
    assert list(read_documents(p)) == [Document("a", "alpha", "A"), Document("7", "seven", "")]


@pytest.mark.parametrize("line, message", [
    ('{"id": "b", "text": ', r"c.jsonl:2: invalid JSON"),
    ('["a"]', r"c.jsonl:2: expected a JSON object"),
    ('{"text": "x"}', r"c.jsonl:2: \"id\" must be"),
    ('{"id": "b", "text": "  "}', r"c.jsonl:2: \"text\" must be a non-empty string"),
    ('{"id": "b", "text": "x", "title": 3}', r"c.jsonl:2: \"title\" must be a string"),
    ('{"id": "a", "text": "again"}', r"c.jsonl:2: duplicate id 'a' \(first seen at .*c.jsonl:1\)"),
])
def test_jsonl_errors_name_the_line(tmp_path, line, message):
    p = write_jsonl(tmp_path / "c.jsonl", ['{"id": "a", "text": "fine"}', line])
    with pytest.raises(CorpusError, match=message):
        list(read_documents(p))


def test_missing_empty_and_unsupported_corpus(tmp_path):
    with pytest.raises(CorpusError, match="no such file"):
        list(read_documents(tmp_path / "nope.jsonl"))
    with pytest.raises(CorpusError, match="has no documents"):
        list(read_documents(write_jsonl(tmp_path / "e.jsonl", [""])))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(CorpusError, match="a corpus is a .jsonl file"):
        list(read_documents(tmp_path / "x.csv"))


def test_directory_of_text_files(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.md").write_text("# Markdown title\n\nbody text")
    (tmp_path / "sub" / "b.rst.txt").write_text("RST title\n=========\n\nbody")
    (tmp_path / "c.html").write_text("<html><head><title>Page</title><script>var x=1;</script></head>"
                                     "<body><p>Hello &amp; welcome</p></body></html>")
    (tmp_path / "skip.bin").write_bytes(b"\x00\x01")
    docs = {d.id: d for d in read_documents(tmp_path)}
    assert set(docs) == {"a.md", "sub/b.rst.txt", "c.html"}
    assert docs["a.md"].title == "Markdown title"
    assert docs["sub/b.rst.txt"].title == "RST title"
    assert docs["c.html"].title == "Page" and docs["c.html"].text == "Hello & welcome"


@pytest.fixture(scope="module")
def bert_tokenizer(tiny_encoder_dir):
    return Tokenizer.from_file(str(tiny_encoder_dir / "tokenizer.json"))


def test_chunks_overlap_and_are_verbatim(bert_tokenizer):
    text = " ".join(f"word{i % 50} lists tuples" for i in range(120))
    doc = Document("d", text, "T")
    passages = list(chunk_documents([doc], bert_tokenizer, max_tokens=40, overlap=10))
    assert [p.id for p in passages] == [f"d#{i}" for i in range(len(passages))]
    assert len(passages) > 3
    for p in passages:
        assert p.text in text and p.title == "T" and p.doc_id == "d"
        assert len(bert_tokenizer.encode(p.text, add_special_tokens=False).ids) <= 40
    for a, b in zip(passages, passages[1:]):
        ta = bert_tokenizer.encode(a.text, add_special_tokens=False).ids
        tb = bert_tokenizer.encode(b.text, add_special_tokens=False).ids
        assert ta[-10:] == tb[:10]                    # neighbours share exactly `overlap` tokens
    assert passages[-1].text.endswith(text[-20:])     # nothing lost at the end
    again = list(chunk_documents([doc], bert_tokenizer, max_tokens=40, overlap=10))
    assert again == passages


def test_short_document_is_one_passage_and_bad_sizes_refused(bert_tokenizer):
    assert [p.text for p in chunk_documents([Document("s", " short text ")], bert_tokenizer)] == ["short text"]
    with pytest.raises(UserInputError, match="overlap"):
        list(chunk_documents([Document("s", "x")], bert_tokenizer, max_tokens=32, overlap=32))


RST = """\
.. _top:

==========
Page Title
==========

Intro with :func:`os.path.join`, :class:`~collections.OrderedDict` and ``code``.

.. index:: single: hidden

   hidden index entry

First section
-------------

See :ref:`the guide <guide-label>` and `Python <https://python.org>`_.

.. function:: open(file, mode='r')
   :noindex:

   Open *file* and return a file object.

First section
-------------

A second section with the same title, long enough to keep.
"""


def test_rst_sections_and_cleanup(tmp_path):
    src = tmp_path / "_sources" / "library"
    src.mkdir(parents=True)
    (src / "page.rst.txt").write_text(RST)
    docs = list(python_docs_documents(tmp_path / "_sources"))
    assert [d.id for d in docs] == ["library/page#page-title", "library/page#first-section",
                                    "library/page#first-section-2"]
    assert docs[0].title == "Page Title"
    assert docs[1].title == "Page Title — First section"
    assert "os.path.join, OrderedDict and code." in docs[0].text
    assert "hidden" not in docs[0].text and ".. _top" not in docs[0].text
    assert "the guide" in docs[1].text and "Python" in docs[1].text and "<https" not in docs[1].text
    assert "open(file, mode='r')" in docs[1].text and ":noindex:" not in docs[1].text
    out = tmp_path / "corpus.jsonl"
    assert write_python_docs_corpus(out, tmp_path / "_sources") == 3
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [d.id for d in docs]


def test_split_sections_keeps_text_before_the_first_title():
    assert split_sections("preamble\n\nTitle\n=====\nbody\n\n===\nTop\n===\nx") == [
        ("", "preamble\n", ""), ("Title", "body\n", "="), ("Top", "x", "^=")]
    assert clean_rst("Example::\n\n   code") == "Example:\n\n   code"


@pytest.mark.skipif(not PYDOCS_SOURCES.is_dir(), reason="Debian python3.11-doc is not installed")
def test_real_python_docs():
    docs = list(python_docs_documents())
    ids = {d.id for d in docs}
    assert len(ids) == len(docs) > 1000
    assert "faq/programming#how-do-i-copy-an-object-in-python" in ids
