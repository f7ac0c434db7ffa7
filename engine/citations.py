"""Quotes: the runs of an answer copied verbatim from a source, so a reader can check where it came from.

A quote is at least MIN_QUOTE_WORDS words in a row, equal in the answer and in the source,
with the same characters between them, so that `answer[a0:a1] == text[p0:p1]` always holds.
Words are runs of letters, digits and underscores; what lies between them (spaces,
punctuation, code symbols) must match too but is not counted. `grounded` is the share of the
answer's words that lie inside some quote of some source.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

MIN_QUOTE_WORDS = 4
_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class Quote:
    answer: tuple[int, int]        # [a0, a1): characters of the answer
    passage: tuple[int, int]       # [p0, p1): characters of the source's text

    def to_dict(self) -> dict:
        return {"answer": list(self.answer), "passage": list(self.passage)}


def _words(text: str) -> list[re.Match]:
    return list(_WORD.finditer(text))


def find_quotes(answer: str, text: str, min_words: int = MIN_QUOTE_WORDS) -> list[Quote]:
    """The longest verbatim runs of `answer` found in `text`, left to right, not overlapping in the answer.

    Greedy: at each answer word, the longest run starting there anywhere in `text` is taken if it
    has `min_words` words, and the search resumes after it. Answers and passages are a few hundred
    words, so the quadratic worst case costs well under a millisecond.
    """
    a, t = _words(answer), _words(text)
    where: dict[str, list[int]] = {}
    for j, m in enumerate(t):
        where.setdefault(m.group(), []).append(j)
    quotes, i = [], 0
    while i < len(a):
        best_len, best_j = 0, -1
        for j in where.get(a[i].group(), ()):
            n = 1
            # The next word extends the run only if it and the characters before it both match.
            while (i + n < len(a) and j + n < len(t) and a[i + n].group() == t[j + n].group()
                   and answer[a[i + n - 1].end():a[i + n].start()] == text[t[j + n - 1].end():t[j + n].start()]):
                n += 1
            if n > best_len:
                best_len, best_j = n, j
        if best_len >= min_words:
            quotes.append(Quote((a[i].start(), a[i + best_len - 1].end()),
                                (t[best_j].start(), t[best_j + best_len - 1].end())))
            i += best_len
        else:
            i += 1
    return quotes


def grounded_share(answer: str, quotes: Sequence[Quote]) -> float:
    """The share of the answer's words inside any quote (of any source); 0 for an answer with no words."""
    words = _words(answer)
    if not words:
        return 0.0
    inside = sum(any(q.answer[0] <= w.start() and w.end() <= q.answer[1] for q in quotes) for w in words)
    return inside / len(words)
