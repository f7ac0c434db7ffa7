"""The three ways to turn retrieved passages into an answer.

- concat:   all k passages in one prompt, greedy decoding (with prompt-lookup drafts, see
            lookup.py). Cheapest, and the default.
- token:    RAG-Token. k prompts (one passage each) decode as one batch, and every step
            takes argmax_y sum_c P(c|q) p(y | q, c, y<t): the passages vote per token.
- sequence: RAG-Sequence. Each passage proposes its greedy answer; every distinct answer a
            is rescored by the marginal P(a|q) = sum_c P(c|q) p(a | q, c) and the best wins.

P(c|q) is the softmax of the retrieval cosine scores over a temperature.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from ragrt.decoding.decoder import Decoder, log_softmax
from ragrt.decoding.lookup import PromptLookup
from ragrt.decoding.prompt import PassageText, PromptBuilder

MODES = ("concat", "token", "sequence")


def passage_prior(scores: Sequence[float], temperature: float) -> np.ndarray:
    """P(c|q) in float64."""
    s = np.asarray(scores, dtype=np.float64)
    # Shifting before dividing keeps a tiny temperature from overflowing to inf - inf = NaN.
    z = np.exp((s - s.max()) / temperature)
    return z / z.sum()


@dataclass
class Run:
    """A generation in progress: iterate `tokens`; the other fields are final once it ends."""
    tokens: Iterator[int]
    prompt_tokens: int
    truncated: bool
    log_prob: list[float] = field(default_factory=list)   # set by token/sequence: log P(answer|q)


def start(mode: str, decoder: Decoder, builder: PromptBuilder, question: str,
          passages: Sequence[PassageText], prior: np.ndarray, max_new_tokens: int) -> Run:
    if mode == "concat":
        prompt = builder.build(question, passages)
        # Checking drafts runs several tokens in one pass; only where the export measured that
        # exact do they get the numbers a one-token step would, keeping plain greedy's output.
        lookup = PromptLookup() if decoder.spec.drafts_exact else None
        return Run(decoder.greedy(prompt.ids, max_new_tokens, lookup), len(prompt.ids), prompt.truncated)
    prompts = [builder.build(question, [p]) for p in passages]
    ids = [p.ids for p in prompts]
    run = Run(iter(()), max(len(i) for i in ids), any(p.truncated for p in prompts))
    if mode == "token":
        run.tokens = _rag_token(decoder, ids, prior, max_new_tokens, run.log_prob)
    else:
        run.tokens = _rag_sequence(decoder, ids, prior, max_new_tokens, run.log_prob)
    return run


def _rag_token(decoder: Decoder, prompts: list[list[int]], prior: np.ndarray,
               max_new_tokens: int, log_prob: list[float]) -> Iterator[int]:
    stop = set(decoder.spec.eos_token_ids)
    log_prior = np.log(prior)[:, None]                          # (k, 1)
    logits, state = decoder.prefill(prompts)                    # (k, V)
    total = 0.0
    for i in range(max_new_tokens):
        mixed = _logsumexp(log_prior + log_softmax(logits), axis=0)   # (V,)
        token = int(mixed.argmax())
        total += float(mixed[token])
        log_prob[:] = [total]
        if token in stop:
            return
        yield token
        if i + 1 < max_new_tokens:
            logits, state = decoder.step(state, np.full(len(prompts), token, dtype=np.int64))


def _rag_sequence(decoder: Decoder, prompts: list[list[int]], prior: np.ndarray,
                  max_new_tokens: int, log_prob: list[float]) -> Iterator[int]:
    last_logits, state = decoder.prefill(prompts)
    candidates = decoder.greedy_batch(last_logits, state, max_new_tokens)
    eos = decoder.spec.eos_token_ids[0]
    best, best_lp = None, -np.inf
    for cand in dict.fromkeys(map(tuple, candidates)):          # distinct, in passage order
        # A finished answer is scored with its EOS, so a truncated prefix cannot win by being short.
        scored = list(cand) + [eos] if len(cand) < max_new_tokens else list(cand)
        lp = _logsumexp(np.log(prior) + decoder.continuation_logprob(state, last_logits, scored), axis=0)
        if lp > best_lp:
            best, best_lp = cand, float(lp)
    log_prob[:] = [best_lp]
    yield from best


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    m = x.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True))).squeeze(axis)
