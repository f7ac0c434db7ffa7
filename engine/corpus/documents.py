"""Reading a corpus (JSONL or a directory of text files) and chunking it into passages."""
from __future__ import annotations

import re
from dataclasses import dataclass
from html.parser import HTMLParser
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator

from tokenizers import Encoding, Tokenizer

from ragrt.errors import CorpusError, UserInputError
from ragrt.corpus.jsonl import iter_jsonl
from ragrt.corpus.text import valid_unicode
from ragrt.retrieval.passages import Passage, passage_id

TEXT_SUFFIXES = (".rst.txt", ".txt", ".md", ".rst", ".html", ".htm")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    title: str = ""


def read_documents(path: str | Path) -> Iterator[Document]:
    """Documents in file order; ids are checked unique. Path errors raise here, content errors while iterating."""
    return (doc for doc, _ in located_documents(path))


def located_documents(path: str | Path) -> Iterator[tuple[Document, str]]:
    """(document, "file:line" or file path) pairs, so later checks can say where a document came from."""
    path = Path(path)
    if not path.exists():
        raise CorpusError(f"{path}: no such file or directory")
    if path.is_dir():
        return _unique(path, _read_directory(path))
    if path.suffix.lower() in JSONL_SUFFIXES:
        return _unique(path, _read_jsonl(path))
    raise CorpusError(f"{path}: a corpus is a .jsonl file or a directory of {', '.join(TEXT_SUFFIXES)} files")


def _unique(path: Path, docs: Iterator[tuple[Document, str]]) -> Iterator[tuple[Document, str]]:
    seen: dict[str, str] = {}
    for doc, where in docs:
        if doc.id in seen:
            raise CorpusError(f"{where}: duplicate id {doc.id!r} (first seen at {seen[doc.id]})")
        seen[doc.id] = where
        yield doc, where
    if not seen:
        raise CorpusError(f"{path}: the corpus has no documents")


def _read_jsonl(path: Path) -> Iterator[tuple[Document, str]]:
    for where, obj in iter_jsonl(path):
        for key in ("id", "text"):
            if key not in obj:
                raise CorpusError(f'{where}: missing "{key}"')
        doc_id, text, title = obj["id"], obj["text"], obj.get("title", "")
        # bool is an int to Python, but an id of `true` is surely a mistake
        if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)) or not str(doc_id).strip():
            raise CorpusError(f'{where}: "id" must be a non-empty string or integer, got {doc_id!r}')
        if not isinstance(text, str) or not text.strip():
            raise CorpusError(f'{where}: "text" must be a non-empty string')
        if not isinstance(title, str | None):
            raise CorpusError(f'{where}: "title" must be a string')
        yield Document(valid_unicode(str(doc_id)), valid_unicode(text), valid_unicode(title or "")), where


def _read_directory(root: Path) -> Iterator[tuple[Document, str]]:
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        suffix = next((s for s in TEXT_SUFFIXES if path.name.lower().endswith(s)), None)
        if suffix is None or not path.is_file() or any(part.startswith(".") for part in rel.parts):
            continue
        stem = path.name[: -len(suffix)]
        raw = path.read_text(encoding="utf-8", errors="replace")
        title, text = html_to_text(raw) if suffix in (".html", ".htm") else (first_heading(raw), raw)
        if text.strip():
            yield Document(rel.as_posix(), text, title or stem), str(path)


_RST_ADORNMENT = re.compile(r"^([=\-~^*\"#+`'])\1{2,}\s*$")


def first_heading(text: str) -> str:
    """A Markdown `# title`, or a reST title: a line underlined with =, -, ~ ... at least as long."""
    lines = text.splitlines()[:200]
    for over, line, under in zip([""] + lines, lines, lines[1:] + [""]):
        if line.startswith("# "):
            return line[2:].strip()
        # only an overlined title may be inset; an indented line is code or a quote
        if line.strip() and (_RST_ADORNMENT.match(over) or not line[0].isspace()) \
                and not _RST_ADORNMENT.match(line) and _RST_ADORNMENT.match(under) \
                and len(under.rstrip()) >= len(line.rstrip()):
            return line.strip()
    return ""


class _TextOfHtml(HTMLParser):
    SKIP = {"script", "style", "head", "noscript", "template"}
    BLOCK = {"p", "div", "br", "li", "ul", "ol", "dl", "dt", "dd", "tr", "table", "blockquote", "hr", "pre",
             "section", "article", "header", "footer", "h1", "h2", "h3", "h4", "h5", "h6"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.title: list[str] = []
        self._skip = 0
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        self._skip += tag in self.SKIP
        self._in_title |= tag in ("title", "h1") and not self.title
        if tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self._skip = max(0, self._skip - 1)
        if tag in ("title", "h1"):
            self._in_title = False
        if tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if self._in_title:
            self.title.append(data)
        if not self._skip:
            self.parts.append(data)


def html_to_text(raw: str) -> tuple[str, str]:
    """(title, text) of an HTML page: `<title>` or else the first `<h1>`; scripts and styles dropped."""
    parser = _TextOfHtml()
    parser.feed(raw)
    parser.close()
    text = re.sub(r"[ \t]+", " ", "".join(parser.parts))
    text = re.sub(r" *\n\s*\n\s*", "\n\n", re.sub(r" *\n *", "\n", text))
    return " ".join("".join(parser.title).split()), text.strip()


def chunk_documents(docs: Iterable[Document], tokenizer: Tokenizer, *, max_tokens: int = 128,
                    overlap: int = 32, batch_size: int = 256) -> Iterator[Passage]:
    """Windows of at most `max_tokens` encoder tokens, neighbours sharing about `overlap` of them.

    Windows are counted in tokens but sliced from the document by character offsets, so a
    passage is a verbatim piece of its source. They end on a word boundary, preferably at a
    paragraph or sentence end in their last quarter. Ids are `passage_id(doc.id, i)`.
    """
    if not 0 <= overlap < max_tokens:
        raise UserInputError(f"chunking needs 0 <= overlap < max_tokens, "
                             f"got overlap={overlap}, max_tokens={max_tokens}")
    # A copy, so that the caller's truncation and padding (which would cut documents short) stay theirs.
    tok = Tokenizer.from_str(tokenizer.to_str())
    tok.no_truncation()
    tok.no_padding()
    return _chunks(iter(docs), tok, max_tokens, overlap, batch_size)


def _chunks(docs: Iterator[Document], tok: Tokenizer, max_tokens: int, overlap: int,
            batch_size: int) -> Iterator[Passage]:
    while batch := list(islice(docs, batch_size)):
        for doc, enc in zip(batch, tok.encode_batch([d.text for d in batch], add_special_tokens=False)):
            yield from _windows(doc, enc, max_tokens, overlap)


def _windows(doc: Document, enc: Encoding, max_tokens: int, overlap: int) -> Iterator[Passage]:
    offsets, words, n = enc.offsets, enc.word_ids, len(enc.offsets)

    def word_start(i: int) -> bool:
        return i in (0, n) or words[i] != words[i - 1]

    start, i = 0, 0
    while start < n:
        end = min(start + max_tokens, n)
        if end < n:
            end = _cut(doc.text, offsets, word_start, start, end, overlap)
        yield Passage(passage_id(doc.id, i), doc.title, doc.text[offsets[start][0]:offsets[end - 1][1]])
        if end == n:
            return
        nxt = end - overlap
        while not word_start(nxt) and nxt > start + 1:
            nxt -= 1        # start on a whole word, sharing a token or two more than `overlap`
        start, i = nxt, i + 1


def _cut(text: str, offsets: list[tuple[int, int]], word_start: Callable[[int], bool], start: int, end: int,
         overlap: int) -> int:
    """Where a window that may not pass `end` should stop. Never at or before start + overlap,
    so that the next window, which starts `overlap` tokens back, still moves forward."""
    lo = max(start + overlap + 1, end - (end - start) // 4)
    sentence = word = None
    for e in range(end, start + overlap, -1):
        if not word_start(e):
            continue
        word = word or e
        if e < lo:
            break
        gap = text[offsets[e - 1][1]:offsets[e][0]]
        if gap.count("\n") >= 2:
            return e
        if sentence is None and gap and text[offsets[e - 1][0]:offsets[e - 1][1]] in (".", "!", "?"):
            sentence = e
    return sentence or word or end
