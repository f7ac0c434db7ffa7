"""Draft tokens for speculative decoding, copied from the text the model already sees.

A RAG answer mostly quotes its passages, so the tokens that followed the last few generated
tokens somewhere in the prompt are a good guess for what comes next (prompt-lookup
decoding). The decoder checks every draft against its own greedy choice in one forward pass,
so the output is the plain greedy output whatever the drafts are; good drafts only make it
arrive in fewer passes. (transformers has prompt lookup too, but only for torch models.)
"""
from __future__ import annotations

from typing import Sequence


class PromptLookup:
    """Finds the latest earlier occurrence of the context's last n tokens (n from `max_ngram`
    down to `min_ngram`) and proposes the `max_draft` tokens that followed it."""

    def __init__(self, max_draft: int = 8, max_ngram: int = 3, min_ngram: int = 2):
        if not 1 <= min_ngram <= max_ngram or max_draft < 1:
            raise ValueError("need 1 <= min_ngram <= max_ngram and max_draft >= 1")
        self.max_draft, self.max_ngram, self.min_ngram = max_draft, max_ngram, min_ngram

    def propose(self, context: Sequence[int]) -> list[int]:
        tokens = list(context)
        for n in range(min(self.max_ngram, len(tokens) - 1), self.min_ngram - 1, -1):
            tail = tokens[-n:]
            # Latest match first: recent text (the answer so far, the nearest passage) predicts best.
            for start in range(len(tokens) - n - 1, -1, -1):
                if tokens[start:start + n] == tail:
                    return tokens[start + n:start + n + self.max_draft]
        return []
