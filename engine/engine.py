"""`Engine`: one opened bundle, answering questions. Everything invariant is settled in `open`."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from tokenizers import Tokenizer

from tokenizers.decoders import DecodeStream

from ragrt.bundle.manifest import Manifest
from ragrt.bundle.reader import Bundle
from ragrt.citations import Quote, find_quotes, grounded_share
from ragrt.decoding.blocks import BlockCache, PassageKV, unavailable
from ragrt.decoding.blockstore import graph_id, live_store
from ragrt.decoding.generator import load_decoder
from ragrt.decoding.prompt import PromptBuilder, Turn
from ragrt.decoding.rag import Run, check_mode, passage_prior, start
from ragrt.decoding.sampling import DecodingConfig
from ragrt.errors import UserInputError
from ragrt.options import HISTORY_IN_QUERY, MAX_K, MAX_TURNS, PASSAGE_KV_CACHE_MB, PASSAGE_KV_MODES
from ragrt.retrieval.encoder import TextEncoder, load_tokenizer
from ragrt.retrieval.live import LiveRetriever
from ragrt.retrieval.retriever import Hit, Retriever
from ragrt.runtime.sessions import SessionConfig

log = logging.getLogger("ragrt")


@dataclass(frozen=True)
class Source:
    id: str
    title: str
    score: float                   # cosine similarity of passage and question, whichever retrieval found it
    prob: float                    # P(c|q): softmax of the scores over the prior temperature
    text: str
    quotes: tuple[Quote, ...] = () # the answer's runs copied from `text` (ragrt.citations), once answered

    def to_dict(self) -> dict:
        return {"id": self.id, "title": self.title, "score": self.score, "prob": self.prob, "text": self.text,
                "quotes": [q.to_dict() for q in self.quotes]}


@dataclass(frozen=True)
class Answer:
    answer: str
    sources: list[Source]
    new_tokens: int
    prompt_tokens: int
    timings_ms: dict[str, float]
    mode: str
    log_prob: float | None = None  # log P(answer|q) in the token and sequence modes
    warnings: list[str] = field(default_factory=list)
    finish_reason: str = "stop"    # "stop": EOS or a stop string; "length": max_new_tokens reached
    passage_kv: dict[str, int] | None = None   # {"reused", "computed"} blocks, when passage KV was on
    grounded: float = 0.0          # share of the answer's words inside quotes of its sources

    def to_dict(self) -> dict:
        return {
            "answer": self.answer,
            "sources": [s.to_dict() for s in self.sources],
            "grounded": self.grounded,
            "new_tokens": self.new_tokens,
            "prompt_tokens": self.prompt_tokens,
            "timings_ms": self.timings_ms,
            "mode": self.mode,
            "log_prob": self.log_prob,
            "warnings": self.warnings,
            "finish_reason": self.finish_reason,
            "passage_kv": self.passage_kv,
        }


class Engine:
    """Open once, then `ask`, `stream`, `retrieve` and `embed` from any number of threads.

    onnxruntime sessions are safe to run concurrently and every call keeps its own KV state,
    so the engine holds no per-request state.
    """

    def __init__(self, bundle: Bundle, session_config: SessionConfig, passage_kv_cache_mb: int = PASSAGE_KV_CACHE_MB):
        m: Manifest = bundle.manifest
        self.bundle = bundle
        self.manifest = m
        self.encoder = TextEncoder.from_spec(bundle.root, m.encoder, session_config)
        self.corpus = LiveRetriever(bundle, self.encoder)
        self.decoder = load_decoder(bundle.root, m.generator, session_config)
        self.tokenizer = load_tokenizer(bundle.path(m.generator.tokenizer))
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.decoding = DecodingConfig.of(m.rag.decoding, m.rag.max_new_tokens)
        self.decoder.cache_prefix(PromptBuilder(m.prompt, self.tokenizer, budget=m.generator.max_context).fixed_prefix())
        self.passage_kv_unavailable = unavailable(self.decoder, m.prompt)
        self.passage_kv = None if self.passage_kv_unavailable else PassageKV(
            self.decoder, graph_id(m), BlockCache(passage_kv_cache_mb << 20),
            store=live_store(lambda: self.corpus.generation, m, self.tokenizer), repair=m.rag.passage_kv_repair)

    @classmethod
    def open(cls, path: str | Path, *, device: str = "auto", threads: int = 0, verify: bool = False,
             passage_kv_cache_mb: int = PASSAGE_KV_CACHE_MB) -> "Engine":
        """`passage_kv_cache_mb` bounds the passage KV computed at question time and kept for reuse."""
        return cls(Bundle.open(path, verify=verify), SessionConfig(device=device, threads=threads),
                   passage_kv_cache_mb)

    @property
    def retriever(self) -> Retriever:
        """The current corpus generation's retriever: a new one after `ragrt index add` or `remove`."""
        return self.corpus.get()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised embeddings (n, dim), float32."""
        return self.encoder.embed_all(list(texts))

    def retrieve(self, question: str, k: int | None = None, retrieval: str | None = None) -> list[Hit]:
        """The top-k passages by `retrieval` ("dense", "bm25", "hybrid"; None: the bundle's default)."""
        retriever = self.retriever
        return retriever.retrieve(_check_question(question), self._k(k), self._retrieval(retriever, retrieval))

    def ask(self, question: str, **options) -> Answer:
        """Options: k, retrieval ("dense", "bm25", "hybrid"), mode, history (earlier turns), task ("qa",
        "summarize"), prior_temperature (of P(c|q)), and the decoding options of `DecodingConfig`
        (temperature, top_k, top_p, seed, repetition_penalty, repetition_window, no_repeat_ngram_size,
        stop, min_new_tokens, max_new_tokens); what is not given comes from the bundle's manifest."""
        stream = self._start(question, **options)
        for _ in stream:
            pass
        return stream.answer

    def stream(self, question: str, **options) -> "AnswerStream":
        """Iterate for text pieces as they are decoded; `.answer` holds the full Answer at the end."""
        return self._start(question, **options)

    def _k(self, k: int | None) -> int:
        k = self.manifest.rag.k if k is None else k
        if not _is_int(k) or not 1 <= k <= MAX_K:
            raise UserInputError(f"k must be an integer from 1 to {MAX_K}, got {k!r}")
        return k

    def _retrieval(self, retriever: Retriever, choice: str | None) -> str:
        """A request's retrieval, checked; None follows the bundle's default while its corpus can."""
        if choice is not None:
            return retriever.check(choice)
        default = self.manifest.rag.retrieval
        if default not in retriever.retrievals:
            # An older ragrt's `index add/remove` writes generations without BM25; they still answer.
            log.warning("the bundle's default retrieval is %s, but its corpus has no BM25 index: dense", default)
            return "dense"
        return default

    def _passage_kv(self, choice: str) -> PassageKV | None:
        """The PassageKV for a request's `passage_kv` ("auto" follows the bundle's measured default)."""
        if choice not in PASSAGE_KV_MODES:
            raise UserInputError(f"passage_kv must be one of {', '.join(PASSAGE_KV_MODES)}, got {choice!r}")
        if choice == "on" and self.passage_kv is None:
            raise UserInputError(f"passage KV is not available for this bundle: {self.passage_kv_unavailable}")
        wanted = choice == "on" or (choice == "auto" and self.manifest.rag.passage_kv == "on")
        return self.passage_kv if wanted else None

    def prepare(self, question: str, *, k: int | None = None, retrieval: str | None = None, mode: str | None = None,
                history: Sequence[Turn | dict] | None = None, task: str = "qa",
                prior_temperature: float | None = None, passage_kv: str = "auto", **decoding) -> "Prepared":
        """Checks the options, embeds, retrieves and sets up the prompt: everything before decoding.

        `ask` and `stream` decode it at once; the server's batcher decodes many together.
        """
        rag = self.manifest.rag
        question = _check_question(question)
        k = self._k(k)
        retriever = self.retriever          # one corpus generation for the whole request
        retrieval = self._retrieval(retriever, retrieval)
        config = self.decoding.updated(self.manifest.generator.max_context, **decoding)
        mode = rag.mode if mode is None else mode
        check_mode(mode, config)
        prior_temperature = rag.temperature if prior_temperature is None else prior_temperature
        if not (isinstance(prior_temperature, (int, float)) and not isinstance(prior_temperature, bool)
                and math.isfinite(prior_temperature) and prior_temperature > 0):
            raise UserInputError(f"prior_temperature must be a finite number > 0, got {prior_temperature!r}")
        passage_kv = self._passage_kv(passage_kv)
        turns = _check_history(history)
        if not isinstance(task, str):
            raise UserInputError(f"task must be a string, got {type(task).__name__}")
        builder = PromptBuilder(self.manifest.prompt, self.tokenizer,
                                budget=self.manifest.generator.max_context - config.max_new_tokens, task=task,
                                history=turns)

        t0 = time.perf_counter()
        # A follow-up ("and in Python 2?") means little alone: the user's recent turns join the query.
        query = " ".join([t.content for t in turns if t.role == "user"][-HISTORY_IN_QUERY:] + [question])
        vector = self.encoder.embed_all([query])[0]
        t1 = time.perf_counter()
        hits = retriever.find(query, vector, k, retrieval)
        t2 = time.perf_counter()
        if not hits:
            raise UserInputError("no passage shares a word with the question, so BM25 found none; "
                                 "ask with retrieval dense or hybrid")
        prior = passage_prior([h.score for h in hits], prior_temperature)
        sources = [Source(h.id, h.title, h.score, float(p), h.text) for h, p in zip(hits, prior)]
        return Prepared(question, mode, config, builder, hits, prior,
                        sources, {"embed": (t1 - t0) * 1e3, "retrieve": (t2 - t1) * 1e3}, t0, passage_kv)

    def answer_stream(self, prepared: "Prepared", run: Run | None = None) -> "AnswerStream":
        """Decodes a prepared request here (or wraps a `run` started elsewhere, as the batcher's)."""
        p = prepared
        if run is None:
            run = start(p.mode, self.decoder, p.builder, p.question, p.passages, p.prior, p.decoding, p.passage_kv,
                        self.manifest.rag.extract)
        return AnswerStream(self.tokenizer, run, p, p.timings)

    def _start(self, question: str, **options) -> "AnswerStream":
        return self.answer_stream(self.prepare(question, **options))


@dataclass(frozen=True)
class Prepared:
    """A checked request with its passages retrieved, ready to decode."""
    question: str
    mode: str
    decoding: DecodingConfig
    builder: PromptBuilder
    passages: list[Hit]
    prior: np.ndarray
    sources: list[Source]
    timings: dict[str, float]
    t0: float
    passage_kv: PassageKV | None = None    # set: the prompt goes in blocks, from reused passage KV


class AnswerStream:
    """Yields answer text as tokens arrive. Breaking out of the loop stops decoding."""

    def __init__(self, tokenizer: Tokenizer, run: Run, prepared: Prepared, timings: dict[str, float]):
        self._tokenizer, self._run, self._prepared = tokenizer, run, prepared
        self._timings = timings
        self.answer: Answer | None = None

    def close(self) -> None:
        """Stops decoding; callable from another thread, for a server whose client went away."""
        try:
            getattr(self._run.tokens, "close", lambda: None)()
        except ValueError:
            # A plain generator cannot be closed while another thread is inside it; the
            # batcher's token streams can, and every other mode stops at max_new_tokens.
            pass

    def __iter__(self) -> Iterator[str]:
        p = self._prepared
        stops = p.decoding.stop
        # tokenizers' incremental decoder: linear in the answer, and it holds back the bytes of a
        # character that spans tokens until the character is complete.
        pieces = DecodeStream(skip_special_tokens=True)
        text, emitted, new_tokens, stopped = "", 0, 0, False
        t_start = time.perf_counter()
        t_first = None
        for token in self._run.tokens:
            if t_first is None:
                t_first = time.perf_counter()
            new_tokens += 1
            text += pieces.step(self._tokenizer, token) or ""
            if stops and (cut := _stop_at(text, stops)) is not None:
                text, stopped = text[:cut], True
                self.close()
                break
            # The answer is the stripped text, and the pieces must add up to it: hold back leading
            # and trailing whitespace, and what could still begin a stop string.
            shown = text.lstrip()
            ready = min(len(shown) - _held_back(shown, stops), len(shown.rstrip()))
            if ready > emitted:
                yield shown[emitted:ready]
                emitted = ready
        text = text.strip()
        if len(text) > emitted:
            yield text[emitted:]
        t_end = time.perf_counter()
        t_first = t_first or t_end
        timings = dict(self._timings)
        timings.update(prefill=(t_first - t_start) * 1e3, decode=(t_end - t_first) * 1e3,
                       total=(t_end - p.t0) * 1e3)
        run = self._run
        if run.blocks is not None:
            timings["kv_assemble"] = run.blocks.assemble_ms
            if run.blocks.repair_ms:
                timings["kv_repair"] = run.blocks.repair_ms
        warnings = ["the question or passages were truncated to fit the context window"] if run.truncated else []
        # Only the passages the prompt holds are sources: the answer saw no others.
        sources = p.sources[:run.passages_used]
        if dropped := len(p.sources) - len(sources):
            warnings.append(f"{dropped} of the {len(p.sources)} passages did not fit the context window and are "
                            "not in the prompt or the sources: ask for fewer (k) or shorter answers (max_new_tokens)")
        at_limit = not stopped and new_tokens >= p.decoding.max_new_tokens and p.mode != "extract"
        sources = [replace(s, quotes=tuple(find_quotes(text, s.text))) for s in sources]
        self.answer = Answer(
            answer=text, sources=sources, grounded=round(grounded_share(text, [q for s in sources for q in s.quotes]), 4),
            new_tokens=new_tokens, prompt_tokens=run.prompt_tokens,
            timings_ms={k: round(v, 2) for k, v in timings.items()}, mode=p.mode,
            log_prob=run.log_prob, warnings=warnings, finish_reason="length" if at_limit else "stop",
            passage_kv=None if run.blocks is None else {"reused": run.blocks.reused, "computed": run.blocks.computed})


def _stop_at(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the earliest stop string begins in `text`, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """The length of the longest tail of `text` that is the start of a stop string."""
    return max((n for s in stops for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])),
               default=0)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_history(history) -> list[Turn]:
    """Turns as `Turn`s or {"role", "content"} dicts; roles "user" and "assistant"."""
    if history is None:
        return []
    if not isinstance(history, (list, tuple)) or len(history) > MAX_TURNS:
        raise UserInputError(f"history must be a list of at most {MAX_TURNS} turns")
    turns = []
    for i, t in enumerate(history):
        role, content = (t.role, t.content) if isinstance(t, Turn) else (
            (t.get("role"), t.get("content")) if isinstance(t, dict) else (None, None))
        if role not in ("user", "assistant") or not isinstance(content, str):
            raise UserInputError(f"history[{i}] must be {{\"role\": \"user\"|\"assistant\", \"content\": str}}")
        turns.append(Turn(role, content))
    return turns


def _check_question(question: str) -> str:
    if not isinstance(question, str):
        raise UserInputError(f"the question must be a string, got {type(question).__name__}")
    # NUL and other control characters carry no meaning here and confuse tokenizers.
    cleaned = "".join(ch for ch in question if ch in "\n\t" or ch.isprintable()).strip()
    if not cleaned:
        raise UserInputError("the question is empty")
    return cleaned
