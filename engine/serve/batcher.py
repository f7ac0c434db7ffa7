"""Micro-batching: concurrent greedy generations share every decoder step.

One worker thread owns the decode loop. Between steps it admits waiting requests (their
prompts prefilled as one batch, then merged into the running batch) and drops the rows that
finished, so a request never waits for a whole batch to end and a long answer never holds
back a short one. Each row keeps its own stop condition: EOS, its token limit, its deadline,
or its reader going away. Prompts in block layout (passage KV) and plain ones share a batch;
each row counts its own reused and computed blocks. Continuous batching as vLLM and TGI do it,
written here because their schedulers drive their own model runners, not an onnxruntime session.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ragrt.decoding.blocks import BlockPrompt, BlockStats, PassageKV
from ragrt.decoding.generator import Generator
from ragrt.decoding.sampling import DecodingConfig, TokenChooser
from ragrt.errors import RagrtError

log = logging.getLogger("ragrt.batcher")


class QueueFull(RagrtError):
    """More requests are waiting than the queue holds; the server answers 429."""


class DeadlineExceeded(RagrtError):
    """A request's deadline passed before its answer was complete."""


class Closed(RagrtError):
    """The batcher is shutting down and takes no new requests."""


_END = object()


@dataclass(eq=False)
class _Row:
    prompt: Sequence[int] | BlockPrompt
    length: int                    # prompt tokens the prefill runs (a block prompt's reused blocks are only copied)
    choose: TokenChooser           # the row's own decoding options, random generator and tokens
    deadline: float                # time.monotonic() seconds
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)   # token ids, then _END or an error
    emitted: int = 0
    cancelled: bool = False        # the reader stopped iterating
    blocks: BlockStats | None = None   # a block prompt's passage KV reused and computed


class Tokens:
    """One row's token ids as the worker decodes them. `close` (or dropping it) frees the row at
    the next step; unlike a generator's close, it is safe from any thread, mid-`next` included."""

    def __init__(self, row: _Row):
        self._row = row
        self._done = False
        self.blocks = row.blocks    # filled in when the row is prefilled, before its first token

    def __iter__(self) -> "Tokens":
        return self

    def __next__(self) -> int:
        if self._done:
            raise StopIteration
        item = self._row.out.get()
        if item is _END or isinstance(item, BaseException):
            self._done = True
            if item is _END:
                raise StopIteration
            raise item
        return item

    def close(self) -> None:
        self._row.cancelled = True

    __del__ = close


@dataclass(frozen=True)
class BatcherStats:
    waiting: int
    active: int
    tokens: int                    # generated since start
    steps: int                     # decoder calls (prefills and steps) since start
    prefill_s: float               # seconds spent prefilling admitted prompts since start
    step_s: float                  # seconds spent in decoder steps (and choosing their tokens) since start


class Batcher:
    """`submit` a prompt, iterate the token ids it returns. Thread-safe; `close` drains in-flight work."""

    def __init__(self, decoder, *, passage_kv: PassageKV | None = None, max_batch: int = 8, max_queue: int = 64,
                 prefill_tokens: int = 512):
        if max_batch < 1 or max_queue < 0:
            raise ValueError("max_batch must be >= 1 and max_queue >= 0")
        self.decoder = decoder
        self.passage_kv = passage_kv            # prefills the rows submitted as BlockPrompts
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.prefill_tokens = prefill_tokens    # prompt tokens admitted per step, beyond the first prompt
        self._stop = set(decoder.spec.eos_token_ids)
        self._cond = threading.Condition()
        self._waiting: deque[_Row] = deque()
        self._active = 0
        self._tokens = 0
        self._steps = 0
        self._prefill_s = self._step_s = 0.0
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="ragrt-batcher", daemon=True)
        self._thread.start()

    def submit(self, prompt: Sequence[int] | BlockPrompt, config: DecodingConfig, *, deadline_s: float) -> "Tokens":
        """Queues one generation; iterate the result for its tokens (it raises the row's errors).
        A BlockPrompt needs the batcher's passage KV; the result's `blocks` then counts its blocks."""
        ids = prompt.ids if isinstance(prompt, BlockPrompt) else prompt
        choose, deadline = TokenChooser(config, self.decoder.spec.eos_token_ids, ids), time.monotonic() + deadline_s
        if isinstance(prompt, BlockPrompt):
            if self.passage_kv is None:
                raise ValueError("a block prompt needs a Batcher made with passage_kv")
            row = _Row(prompt, self.passage_kv.prefill_cost(prompt), choose, deadline, blocks=BlockStats())
        else:
            row = _Row(list(prompt), len(prompt), choose, deadline)
        with self._cond:
            if self._closing:
                raise Closed("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting; retry later")
            self._waiting.append(row)
            self._cond.notify()
        return Tokens(row)

    def stats(self) -> BatcherStats:
        with self._cond:
            return BatcherStats(len(self._waiting), self._active, self._tokens, self._steps,
                                self._prefill_s, self._step_s)

    def close(self, timeout: float | None = None) -> None:
        """Takes no new work; returns once every queued and running request has finished."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout)

    def _loop(self) -> None:
        rows: list[_Row] = []
        gen = self._generator()                   # one row per entry of `rows`, in order
        while True:
            with self._cond:
                while not rows and not self._waiting:
                    if self._closing:
                        return
                    self._cond.wait()
                new, budget = [], self.prefill_tokens
                # Prefill is compute-bound: batching long prompts gains nothing and pads the shorter
                # ones, so a step admits prompts up to a token budget (always at least one).
                while self._waiting and len(rows) + len(new) < self.max_batch and (
                        not new or self._waiting[0].length <= budget):
                    budget -= self._waiting[0].length
                    new.append(self._waiting.popleft())
            try:
                new = [r for r in new if self._still_wanted(r)]
                with self._cond:
                    self._active = len(rows) + len(new)
                if new:
                    t0 = time.perf_counter()
                    gen.add_prompts([r.prompt for r in new], [r.blocks for r in new])
                    rows += new
                    self._steps += 1
                    self._prefill_s += time.perf_counter() - t0
                if not rows:
                    continue
                t0 = time.perf_counter()
                rows = self._step(rows, gen)
                self._step_s += time.perf_counter() - t0
                if not rows:
                    gen = self._generator()           # the next request must not join finished rows
            except Exception as e:  # a failed decoder call fails the rows it carried, not the server
                log.exception("decoding failed")
                for r in rows + new:
                    r.out.put(RagrtError(f"decoding failed: {type(e).__name__}: {e}"))
                rows, gen = [], self._generator()

    def _generator(self) -> Generator:
        return Generator(self.decoder, passage_kv=self.passage_kv)

    def _step(self, rows: list[_Row], gen: Generator) -> list[_Row]:
        """Emits one token per row, retires finished rows, and runs the next step for the rest."""
        tokens = np.array([r.choose(logits) for r, logits in zip(rows, gen.logits)], dtype=np.int64)   # (B,)
        now = time.monotonic()
        keep, emitted = [], 0
        for i, r in enumerate(rows):
            token = int(tokens[i])
            if r.cancelled:
                continue
            if now > r.deadline:
                r.out.put(DeadlineExceeded(f"the deadline passed after {r.emitted} tokens"))
                continue
            if token in self._stop:
                r.out.put(_END)
                continue
            r.out.put(token)
            r.emitted += 1
            emitted += 1
            if r.emitted >= r.choose.config.max_new_tokens:
                r.out.put(_END)
            else:
                keep.append(i)
        with self._cond:
            self._tokens += emitted
            self._active = len(keep)
        if not keep:
            return []
        gen.keep(keep)
        gen.append(tokens[keep])
        self._steps += 1
        return [rows[i] for i in keep]

    def _still_wanted(self, row: _Row) -> bool:
        if row.cancelled:
            return False
        if time.monotonic() > row.deadline:
            row.out.put(DeadlineExceeded("the deadline passed while the request waited in the queue"))
            return False
        return True

