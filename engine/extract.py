"""Extractive answers: the sentences of the retrieved passages that best answer the question,
chosen without the generator: the best sentence and those that follow it in its passage.

Each sentence is scored by what `ExtractSettings` weighs: its passage's P(c|q), its place in the
passage (documentation says the answer first), whether it opens its document, and how many of the
question's content words it holds. `passages` are anything with `.id` and `.text` (a `Passage`).
The weights are the manifest's (`rag.extract`); the defaults were chosen on the FAQ dev split
(benchmarks/README.md, "Answers against the quote references") and the export fits `words` to `--dev` answers. docs/eval.md defines the mode.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)|\n\s*\n")
_WORD = re.compile(r"\w+")
# Words that say nothing of what a question is about; the question's other words are matched.
STOPWORDS = frozenset("""a an the is are was were be been being do does did how what why when where which who whom
whose can could should would will shall may might must i you he she it we they me my your its our their this that these
those there here of in on at to for from by with about as into than then so if or and but not no yes use used using get
""".split())


@dataclass(frozen=True)
class ExtractSettings:
    words: int = 60                # at most this many words
    prior: float = 1.0             # weight of log P(c|q) of the sentence's passage
    position: float = 0.5          # penalty per earlier sentence of the same passage
    opening: float = 3.0           # bonus for the first sentence of a document (its passage #0)
    question_words: float = 1.0    # weight of the share of the question's content words in the sentence


@dataclass(frozen=True)
class Sentence:
    rank: int                      # of its passage among the retrieved ones, from 0
    start: int                     # characters of the passage's text
    end: int
    score: float


def split_sentences(text: str) -> list[tuple[int, int]]:
    """Character spans of the sentences of `text`: ends at ., ! or ? before a space, and at blank lines."""
    spans, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        if text[start:m.start()].strip():
            spans.append(_trimmed(text, start, m.start()))
        start = m.end()
    if text[start:].strip():
        spans.append(_trimmed(text, start, len(text)))
    return spans


def _trimmed(text: str, start: int, end: int) -> tuple[int, int]:
    while text[start].isspace():
        start += 1
    while text[end - 1].isspace():
        end -= 1
    return start, end


def content_words(text: str) -> set[str]:
    return {w for w in (m.group().lower() for m in _WORD.finditer(text)) if w not in STOPWORDS}


def score_sentences(question: str, passages: Sequence, prior: Sequence[float],
                    s: ExtractSettings) -> list[Sentence]:
    asked = content_words(question)
    scored = []
    for rank, (p, pr) in enumerate(zip(passages, prior)):
        opens_document = p.id.endswith("#0")          # passage_id(document, 0)
        for i, (a, b) in enumerate(split_sentences(p.text)):
            share = len(asked & content_words(p.text[a:b])) / len(asked) if asked else 0.0
            score = (s.prior * math.log(max(pr, 1e-12)) - s.position * i + s.opening * (opens_document and i == 0)
                     + s.question_words * share)
            scored.append(Sentence(rank, a, b, score))
    return scored


def extract(question: str, passages: Sequence, prior: Sequence[float], s: ExtractSettings) -> str:
    """The best-scored sentence and the ones that follow it in its passage, while they fit in
    `s.words` words; the run also ends at a paragraph break once it holds `s.words // 2` words.
    Documentation answers first and then elaborates, so a run reads better than sentences
    gathered from several places."""
    sentences = score_sentences(question, passages, prior, s)
    if not sentences:
        return ""
    best = max(sentences, key=lambda x: x.score)
    text = passages[best.rank].text
    run = [x for x in sentences if x.rank == best.rank and x.start >= best.start]
    end, words = run[0].end, len(text[run[0].start:run[0].end].split())
    for prev, nxt in zip(run, run[1:]):
        n = len(text[nxt.start:nxt.end].split())
        if words + n > s.words or (words >= s.words // 2 and "\n\n" in text[prev.end:nxt.start]):
            break
        end, words = nxt.end, words + n
    return text[best.start:end]


def lead(passages: Sequence, words: int) -> str:
    """The quote reference: the top passage's first `words` words, verbatim (its own spacing kept)."""
    if not passages:
        return ""
    text = passages[0].text
    spans = list(re.finditer(r"\S+", text))
    return text[spans[0].start():spans[min(words, len(spans)) - 1].end()] if spans else ""
