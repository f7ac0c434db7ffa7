"""Choosing each next token: greedy or sampled, after the penalties every peer engine offers.

The order is transformers' and CTranslate2's: repetition penalty, no-repeat n-gram ban, the EOS
ban until `min_new_tokens`, then temperature, top-k, top-p and a draw from the row's own seeded
generator. Temperature 0 is greedy: the argmax of the processed logits.

Penalties look at the answer's own tokens only, never the prompt: a RAG answer should quote its
passages, and penalising passage tokens would push it away from them. `copy_bias` goes the other
way: it adds to the logit of the token that continues the longest run of the answer's last tokens
(up to COPY_NGRAM) found in the prompt, so an answer that started quoting a passage keeps quoting
it (the spans prompt-lookup drafts find, lookup.py). It comes first, so the penalties still apply.

Written here in numpy: transformers' logits processors need torch, and onnxruntime-genai's
search runs only inside its own generator, over its own model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Sequence

import numpy as np

from ragrt.errors import UserInputError

MAX_STOP_STRINGS = 4       # OpenAI's limit, so its clients' requests fit ours
COPY_NGRAM = 4             # the longest answer tail copy_bias looks up in the prompt


@dataclass(frozen=True)
class DecodingDefaults:
    """The decoding options a bundle's manifest sets for every surface (`rag.decoding`)."""
    min_new_tokens: int = 0        # EOS is banned until this many tokens were generated
    temperature: float = 0.0       # 0: greedy
    top_k: int = 0                 # sample among the k likeliest tokens; 0: all
    top_p: float = 1.0             # sample among the likeliest tokens holding this much probability
    seed: int | None = None        # None: a fresh random draw per request
    repetition_penalty: float = 1.0     # > 1 makes tokens already in the answer's window less likely
    repetition_window: int = 64         # the answer's latest tokens the penalty looks at
    no_repeat_ngram_size: int = 0       # n > 0: no n-gram occurs twice in the answer
    stop: tuple[str, ...] = ()          # the answer ends before the first of these strings
    copy_bias: float = 0.0              # > 0: added to the logit that continues a run copied from the prompt


@dataclass(frozen=True)
class DecodingConfig(DecodingDefaults):
    """One request's decoding: the bundle's defaults, the caller's options, and the answer's length."""
    max_new_tokens: int = 128

    @classmethod
    def of(cls, defaults: DecodingDefaults, max_new_tokens: int) -> "DecodingConfig":
        return cls(**{f.name: getattr(defaults, f.name) for f in fields(defaults)}, max_new_tokens=max_new_tokens)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    @property
    def is_plain_greedy(self) -> bool:
        """Argmax of the raw logits: what the export's exactness checks reproduce token for token."""
        return (self.is_greedy and self.repetition_penalty == 1.0 and self.no_repeat_ngram_size == 0
                and self.min_new_tokens == 0 and self.copy_bias == 0)

    def updated(self, max_context: int, **options) -> "DecodingConfig":
        """A copy with the options that are not None, checked; `max_context` bounds the answer length."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise UserInputError(f"unknown decoding option {unknown[0]!r}; known: {', '.join(sorted(known))}")
        given = {k: v for k, v in options.items() if v is not None}
        if isinstance(given.get("stop"), str):
            given["stop"] = (given["stop"],)
        if isinstance(given.get("stop"), list):
            given["stop"] = tuple(given["stop"])
        config = replace(self, **given)
        config.check(max_context)
        return config

    def check(self, max_context: int) -> None:
        limit = max_context // 2
        _integer("max_new_tokens", self.max_new_tokens, 1, limit)
        _integer("min_new_tokens", self.min_new_tokens, 0, self.max_new_tokens)
        _number("temperature", self.temperature, 0.0, 2.0)
        _integer("top_k", self.top_k, 0, 1 << 20)
        _number("top_p", self.top_p, 0.0, 1.0)
        if self.top_p == 0:
            raise UserInputError("top_p must be > 0 (1 keeps every token)")
        if self.seed is not None:
            _integer("seed", self.seed, 0, 2**63 - 1)
        _number("repetition_penalty", self.repetition_penalty, 1.0, 10.0)
        _integer("repetition_window", self.repetition_window, 1, max_context)
        _integer("no_repeat_ngram_size", self.no_repeat_ngram_size, 0, 16)
        _number("copy_bias", self.copy_bias, 0.0, 20.0)
        if (not isinstance(self.stop, tuple) or len(self.stop) > MAX_STOP_STRINGS
                or not all(isinstance(s, str) and s for s in self.stop)):
            raise UserInputError(f"stop must be a string or a list of at most {MAX_STOP_STRINGS} non-empty strings")


def _integer(name: str, value, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise UserInputError(f"{name} must be an integer from {low} to {high}, got {value!r}")


def _number(name: str, value, low: float, high: float) -> None:
    if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
            or not low <= value <= high):
        raise UserInputError(f"{name} must be a number from {low:g} to {high:g}, got {value!r}")


class TokenChooser:
    """One answer's choice of next token: its config, its random generator, and its tokens so far."""

    def __init__(self, config: DecodingConfig, eos_token_ids: Sequence[int], prompt: Sequence[int] = ()):
        """`prompt`: the tokens copy_bias copies from (none: no bias)."""
        self.config = config
        self.eos = np.asarray(sorted(eos_token_ids), dtype=np.int64)
        self.rng = np.random.default_rng(config.seed)
        self.answer: list[int] = []
        self.follows = following_tokens(prompt, COPY_NGRAM) if config.copy_bias and len(prompt) else {}

    def __call__(self, logits: np.ndarray) -> int:
        """The next token for logits (V,); remembers it."""
        c = self.config
        if c.is_plain_greedy:
            token = int(logits.argmax())
        else:
            scores = self.processed(logits)
            token = int(scores.argmax()) if c.is_greedy else self._draw(scores)
        self.answer.append(token)
        return token

    def processed(self, logits: np.ndarray) -> np.ndarray:
        """The logits after the repetition penalty, the n-gram ban and the EOS ban, in float64."""
        c = self.config
        scores = logits.astype(np.float64)
        if self.follows and self.answer:
            tail = tuple(self.answer[-COPY_NGRAM:])
            nxt = next((self.follows[tail[i:]] for i in range(len(tail)) if tail[i:] in self.follows), None)
            if nxt is not None:
                scores[nxt] += c.copy_bias
        if c.repetition_penalty != 1.0 and self.answer:
            seen = np.unique(self.answer[-c.repetition_window:])
            # CTRL's rule (as transformers and CTranslate2): shrink positive logits, grow negative ones.
            s = scores[seen]
            scores[seen] = np.where(s > 0, s / c.repetition_penalty, s * c.repetition_penalty)
        n = c.no_repeat_ngram_size
        if n and len(self.answer) >= n - 1:
            banned = banned_tokens(self.answer, n)
            if banned:
                scores[list(banned)] = -np.inf
        if len(self.answer) < c.min_new_tokens:
            scores[self.eos] = -np.inf
        return scores

    def _draw(self, scores: np.ndarray) -> int:
        c = self.config
        order = np.argsort(-scores, kind="stable")
        if c.top_k:
            order = order[:c.top_k]
        # Shifting before dividing keeps a tiny temperature from overflowing to inf - inf = NaN.
        with np.errstate(over="ignore"):       # far below the best, a token's weight is 0
            probs = np.exp((scores[order] - scores[order[0]]) / c.temperature)
        probs /= probs.sum()
        if c.top_p < 1.0:
            # The smallest head of the sorted tokens whose mass reaches top_p (at least one token).
            cut = int(np.searchsorted(np.cumsum(probs), c.top_p)) + 1
            order, probs = order[:cut], probs[:cut] / probs[:cut].sum()
        return int(order[self.rng.choice(len(order), p=probs)])


def following_tokens(prompt: Sequence[int], longest: int) -> dict[tuple[int, ...], int]:
    """Every run of 1 to `longest` prompt tokens -> the token after its latest occurrence."""
    ids = list(prompt)
    return {tuple(ids[i:i + n]): ids[i + n] for n in range(1, longest + 1) for i in range(len(ids) - n)}


def banned_tokens(answer: Sequence[int], n: int) -> set[int]:
    """Tokens that would complete an n-gram already in `answer` (transformers' no_repeat_ngram_size)."""
    if n == 1:
        return set(answer)
    tail = tuple(answer[len(answer) - n + 1:])
    return {answer[i + n - 1] for i in range(len(answer) - n + 1) if tuple(answer[i:i + n - 1]) == tail}
