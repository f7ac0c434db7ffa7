"""`ragrt data python-faq`: a real development dataset, built offline from Debian's `python3.11-doc`.

- corpus.jsonl: the Python docs, one document per section. The FAQ answers are documents
  too, titled by their page and category only: a title that repeats its question would
  make retrieval trivial.
- train/dev/test.jsonl: the FAQ questions, `{"id", "question", "answer", "positive_ids"}`.
  `answer` is the first paragraph of the FAQ's answer; `positive_ids` names the answer's
  document, so any passage cut from it counts as relevant.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from ragrt.bundle.atomic import atomic_open

from ragrt.export.data.pydocs import PYDOCS_SOURCES, _slug, clean_rst, clean_title, python_docs_documents, split_sections

SPLITS = (("train", 0.6), ("dev", 0.2), ("test", 0.2))
MAX_ANSWER_WORDS = 60


@dataclass(frozen=True)
class FaqItem:
    doc_id: str
    question: str
    title: str                     # page — category, never the question
    text: str                      # the whole answer
    answer: str                    # its opening, the reference for answer metrics


def first_paragraph(text: str) -> str:
    """The opening of the answer: paragraphs until 25 words, at most MAX_ANSWER_WORDS.

    More than one paragraph when the first is a lead-in such as "As Guido said:"."""
    words: list[str] = []
    for para in re.split(r"\n\s*\n", text):
        words += para.split()
        if len(words) >= 25:
            break
    return " ".join(words[:MAX_ANSWER_WORDS])


def faq_items(source: Path = PYDOCS_SOURCES) -> list[FaqItem]:
    items = []
    for path in sorted((source / "faq").glob("*.rst.txt")):
        page_name = path.name[: -len(".rst.txt")]
        page, category = "", ""
        used: dict[str, int] = {}
        for title, body, style in split_sections(path.read_text(encoding="utf-8", errors="replace")):
            title = clean_title(title)
            if style.startswith("^"):
                page = title
            elif style == "=":
                category = title
            elif style == "-":
                text = clean_rst(body)
                if len(text) < 20:
                    continue
                slug = _slug(title)
                used[slug] = used.get(slug, 0) + 1
                slug = slug if used[slug] == 1 else f"{slug}-{used[slug]}"
                heading = f"{page} — {category}" if category else page
                items.append(FaqItem(f"faq/{page_name}#{slug}", title, heading, text, first_paragraph(text)))
    return items


def split_of(question: str) -> str:
    """Deterministic and stable: a question's split depends on its text alone."""
    u = int(hashlib.sha256(question.encode()).hexdigest()[:8], 16) / 2**32
    edge = 0.0
    for name, share in SPLITS:
        edge += share
        if u < edge:
            return name
    return SPLITS[-1][0]


def _write_jsonl(path: Path, rows) -> int:
    n = 0
    with atomic_open(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def write_python_faq(out: str | Path, source: Path = PYDOCS_SOURCES) -> dict[str, int]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    items = faq_items(source)
    faq_ids = {i.doc_id for i in items}
    docs = [{"id": d.id, "title": d.title, "text": d.text}
            for d in python_docs_documents(source) if d.id not in faq_ids]
    docs += [{"id": i.doc_id, "title": i.title, "text": i.text} for i in items]
    counts = {"corpus": _write_jsonl(out / "corpus.jsonl", docs)}
    for name, _ in SPLITS:
        rows = [{"id": i.doc_id, "question": i.question, "answer": i.answer, "positive_ids": [i.doc_id]}
                for i in items if split_of(i.question) == name]
        counts[name] = _write_jsonl(out / f"{name}.jsonl", rows)
    return counts
