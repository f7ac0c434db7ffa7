"""The three ways to turn retrieved passages into an answer.

- concat:   all k passages in one prompt, one answer (with prompt-lookup drafts where the
            export measured them exact, see lookup.py). Cheapest, and the default.
- token:    RAG-Token. k prompts (one passage each) decode as one batch, and every step
            chooses from sum_c P(c|q) p(y | q, c, y<t): the passages vote per token.
- sequence: RAG-Sequence. Each passage proposes its answer; every distinct answer a is
            rescored by the marginal P(a|q) = sum_c P(c|q) p(a | q, c) and the best wins.

- extract:  no generator: the passages' sentences that best answer the question (ragrt.extract),
            given as the generator's tokens of that text, so every surface streams it alike.

P(c|q) is the softmax of the retrieval cosine scores over a temperature.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from ragrt.decoding.blocks import BlockPrompt, BlockStats, PassageKV
from ragrt.decoding.decoder import log_softmax
from ragrt.decoding.generator import Generator, generate, generate_rows
from ragrt.decoding.lookup import PromptLookup
from ragrt.decoding.prompt import PromptBuilder
from ragrt.decoding.sampling import DecodingConfig, TokenChooser
from ragrt.errors import UserInputError
from ragrt.extract import ExtractSettings, extract
from ragrt.options import MODES
from ragrt.retrieval.passages import Passage


def passage_prior(scores: Sequence[float], temperature: float) -> np.ndarray:
    """P(c|q) in float64."""
    s = np.asarray(scores, dtype=np.float64)
    # Shifting before dividing keeps a tiny temperature from overflowing to inf - inf = NaN.
    z = np.exp((s - s.max()) / temperature)
    return z / z.sum()


class Scored:
    """The tokens of a RAG-Token or RAG-Sequence run, and log P(answer|q) once they end."""

    def __init__(self, tokens: Iterator[int]):
        self._tokens = tokens
        self.log_prob: float | None = None

    def __iter__(self) -> Iterator[int]:
        self.log_prob = yield from self._tokens

    def close(self) -> None:
        self._tokens.close()


@dataclass
class Run:
    """A generation in progress: iterate `tokens`; `log_prob` is final once it ends."""
    tokens: Iterator[int]
    prompt_tokens: int
    truncated: bool
    passages_used: int                  # the leading passages the prompt holds (each of them, in token and sequence)
    blocks: BlockStats | None = None    # passage KV reused and computed, when the prompt was in blocks

    @property
    def log_prob(self) -> float | None:
        """log P(answer|q) in the token and sequence modes."""
        return self.tokens.log_prob if isinstance(self.tokens, Scored) else None


def check_mode(mode: str, config: DecodingConfig) -> None:
    if not isinstance(mode, str) or mode not in MODES:
        raise UserInputError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "sequence" and not config.is_greedy:
        raise UserInputError("mode 'sequence' ranks each passage's greedy answer by its marginal "
                             "probability; sampling does not apply: use temperature 0, or mode concat or token")
    if mode == "extract" and not config.is_greedy:
        raise UserInputError("mode 'extract' quotes the passages and generates nothing, so it cannot sample: "
                             "use temperature 0, or mode concat or token")


def start(mode: str, decoder, builder: PromptBuilder, question: str, passages: Sequence[Passage],
          prior: np.ndarray, config: DecodingConfig, passage_kv: PassageKV | None = None,
          extract_settings: ExtractSettings = ExtractSettings()) -> Run:
    """Starts decoding; with `passage_kv`, prompts are in block layout and only their tails are prefilled."""
    check_mode(mode, config)
    if mode == "extract":
        text = extract(question, passages, prior, extract_settings)
        ids = builder.tokenizer.encode(text, add_special_tokens=False).ids
        # Whole sentences, never cut at max_new_tokens: a cut word is in no source. Its length is rag.extract.words.
        return Run(iter(ids), 0, False, len(passages))
    blocks = BlockStats() if passage_kv is not None else None
    if mode == "concat":
        prompt, length, truncated, used = concat_prompt(builder, question, passages, passage_kv is not None)
        # Checking drafts runs several tokens in one pass: only where the export measured that
        # exact, or the answers unchanged within noise, as a one-token step would give them.
        lookup = PromptLookup() if decoder.spec.drafts_exact or decoder.spec.drafts else None
        tokens = generate(decoder, prompt, config, lookup, passage_kv=passage_kv, blocks=blocks)
        return Run(tokens, length, truncated, used, blocks)
    prompts, lengths, cut, _ = zip(*(concat_prompt(builder, question, [p], passage_kv is not None) for p in passages))
    loop = _rag_token if mode == "token" else _rag_sequence
    gen = Generator(decoder, passage_kv=passage_kv, blocks=blocks)
    return Run(Scored(loop(gen, list(prompts), prior, config)), max(lengths), any(cut), len(passages), blocks)


def concat_prompt(builder: PromptBuilder, question: str, passages: Sequence[Passage], blocks: bool
                  ) -> tuple[list[int] | BlockPrompt, int, bool, int]:
    """The prompt (token ids, or the block layout), its length, whether anything was cut, and how
    many of the passages it holds."""
    if blocks:
        prompt, truncated = builder.build_blocks(question, passages)
        return prompt, len(prompt.ids), truncated, len(prompt.blocks)
    built = builder.build(question, passages)
    return built.ids, len(built.ids), built.truncated, built.passages_used


def _rag_token(gen: Generator, prompts: list, prior: np.ndarray, config: DecodingConfig):
    stop = set(gen.decoder.spec.eos_token_ids)
    choose = TokenChooser(config, gen.decoder.spec.eos_token_ids)
    log_prior = np.log(prior)[:, None]                          # (k, 1)
    gen.add_prompts(prompts)                                    # k rows, prefilled once iteration starts
    total = 0.0
    for i in range(config.max_new_tokens):
        mixed = _logsumexp(log_prior + log_softmax(gen.logits), axis=0)   # (V,) log P(y | q, y<t)
        token = choose(mixed)
        total += float(mixed[token])
        if token in stop:
            return total
        yield token
        if i + 1 < config.max_new_tokens:
            gen.append(np.full(gen.rows, token, dtype=np.int64))
    return total


def _rag_sequence(gen: Generator, prompts: list, prior: np.ndarray, config: DecodingConfig):
    gen.add_prompts(prompts)
    scorer = gen.copy()
    candidates = generate_rows(gen, config)
    eos = gen.decoder.spec.eos_token_ids[0]
    best, best_lp = None, -np.inf
    for cand in dict.fromkeys(map(tuple, candidates)):          # distinct, in passage order
        # A finished answer is scored with its EOS, so a truncated prefix cannot win by being short.
        scored = list(cand) + [eos] if len(cand) < config.max_new_tokens else list(cand)
        lp = _logsumexp(np.log(prior) + scorer.logprob(scored), axis=0)
        if lp > best_lp:
            best, best_lp = cand, float(lp)
    yield from best
    return best_lp


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    m = x.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True))).squeeze(axis)
