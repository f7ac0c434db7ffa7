"""Reading a corpus (JSONL or a directory of text files) and chunking it into passages."""
from __future__ import annotations

import re
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Iterable, Iterator

from engine.errors import CorpusError, UserInputError
from engine.jsonl import iter_jsonl

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".html", ".htm")


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    title: str = ""


@dataclass(frozen=True)
class Passage:
    id: str
    doc_id: str
    title: str
    text: str


def read_documents(path: str | Path) -> Iterator[Document]:
    path = Path(path)
    if not path.exists():
        raise CorpusError(f"{path}: no such file or directory")
    if path.is_dir():
        docs = _read_directory(path)
    elif path.suffix in (".jsonl", ".json", ".ndjson"):
        docs = _read_jsonl(path)
    else:
        raise CorpusError(f"{path}: a corpus is a .jsonl file or a directory of {', '.join(TEXT_SUFFIXES)} files")
    seen: dict[str, str] = {}
    for doc, where in docs:
        if doc.id in seen:
            raise CorpusError(f"{where}: duplicate id {doc.id!r} (first seen at {seen[doc.id]})")
        seen[doc.id] = where
        yield doc
    if not seen:
        raise CorpusError(f"{path}: the corpus has no documents")


def _read_jsonl(path: Path) -> Iterator[tuple[Document, str]]:
    for where, obj in iter_jsonl(path):
        doc_id, text, title = obj.get("id"), obj.get("text"), obj.get("title", "")
        if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)) or str(doc_id).strip() == "":
            raise CorpusError(f"{where}: \"id\" must be a non-empty string or integer")
        if not isinstance(text, str) or not text.strip():
            raise CorpusError(f"{where}: \"text\" must be a non-empty string")
        if title is None:
            title = ""
        if not isinstance(title, str):
            raise CorpusError(f"{where}: \"title\" must be a string")
        yield Document(str(doc_id), text, title), where


def _read_directory(root: Path) -> Iterator[tuple[Document, str]]:
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        name = path.name.lower()
        if not name.endswith(TEXT_SUFFIXES):
            continue
        raw = path.read_text(encoding="utf-8", errors="replace")
        if name.endswith((".html", ".htm")):
            title, text = html_to_text(raw)
        else:
            text = raw
            title = first_heading(raw) or path.name.split(".")[0]
        if text.strip():
            yield Document(path.relative_to(root).as_posix(), text, title or path.name.split(".")[0]), str(path)


_RST_UNDERLINE = re.compile(r"^([=\-~^*\"#+`'])\1{2,}\s*$")


def first_heading(text: str) -> str:
    """A Markdown `# title` or a reST title (a line underlined with =, -, ~ ...)."""
    lines = text.splitlines()
    for i, line in enumerate(lines[:200]):
        if line.startswith("# "):
            return line[2:].strip()
        if i + 1 < len(lines) and line.strip() and not _RST_UNDERLINE.match(line) \
                and _RST_UNDERLINE.match(lines[i + 1]) and len(lines[i + 1].rstrip()) >= len(line.rstrip()):
            return line.strip()
    return ""


class _TextOfHtml(HTMLParser):
    SKIP = {"script", "style", "head"}
    BLOCK = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "section", "article"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.title = ""
        self._skip = 0
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self._skip += 1
        if tag in ("title", "h1") and not self.title:
            self._in_title = True
        if tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self._skip = max(0, self._skip - 1)
        if tag in ("title", "h1"):
            self._in_title = False

    def handle_data(self, data):
        if self._in_title:
            self.title += data.strip()
        if not self._skip:
            self.parts.append(data)


def html_to_text(raw: str) -> tuple[str, str]:
    parser = _TextOfHtml()
    parser.feed(raw)
    text = re.sub(r"[ \t]+", " ", "".join(parser.parts))
    return parser.title, re.sub(r"\n\s*\n+", "\n\n", text).strip()


def chunk_documents(docs: Iterable[Document], tokenizer, *, max_tokens: int = 128,
                    overlap: int = 32) -> Iterator[Passage]:
    """Windows of `max_tokens` encoder tokens, `overlap` shared between neighbours.

    Windows are cut on token boundaries but their text is sliced from the original document
    by character offsets, so a passage reads exactly as the source does.
    """
    if max_tokens < 8 or not 0 <= overlap < max_tokens:
        raise UserInputError(f"need max_tokens >= 8 and 0 <= overlap < max_tokens, got {max_tokens} and {overlap}")
    tokenizer.no_truncation()
    tokenizer.no_padding()
    step = max_tokens - overlap
    for doc in docs:
        enc = tokenizer.encode(doc.text, add_special_tokens=False)
        offsets = enc.offsets
        if not offsets:
            continue
        starts = range(0, max(len(offsets) - overlap, 1), step)
        for n, start in enumerate(starts):
            end = min(start + max_tokens, len(offsets))
            text = doc.text[offsets[start][0]:offsets[end - 1][1]].strip()
            if text:
                yield Passage(f"{doc.id}#{n}", doc.id, doc.title, text)
            if end == len(offsets):
                break
