"""The server's request layer: what the routes share, and how a request's answer starts on it."""
from __future__ import annotations

import logging

from ragrt.decoding.rag import Run, concat_prompt
from ragrt.engine import AnswerStream, Engine, Prepared
from ragrt.errors import RagrtError
from ragrt.serve.batcher import Batcher
from ragrt.serve.config import ServerConfig
from ragrt.serve.http_errors import NotReady
from ragrt.serve.metrics import Metrics

log = logging.getLogger("ragrt.server")


class Services:
    """What the routes share: the engine once open, the batcher over its decoder, and the metrics."""

    def __init__(self, config: ServerConfig, engine: Engine | None):
        self.config = config
        self.engine: Engine | None = None
        self.batcher: Batcher | None = None
        self.failure: str | None = None
        self.metrics = Metrics(lambda: self.batcher.stats() if self.batcher else None)
        if engine is not None:
            self._attach(engine)

    def _attach(self, engine: Engine) -> None:
        self.batcher = Batcher(engine.decoder, passage_kv=engine.passage_kv, max_batch=self.config.max_batch,
                               max_queue=self.config.max_queue)
        self.engine = engine

    def open(self) -> None:
        try:
            self._attach(Engine.open(self.config.bundle, device=self.config.device, threads=self.config.threads,
                                     passage_kv_cache_mb=self.config.passage_kv_cache_mb))
        except Exception as e:  # the server stays up to say why on /readyz
            self.failure = f"{type(e).__name__}: {e}" if not isinstance(e, RagrtError) else str(e)
            log.error("cannot open %s: %s", self.config.bundle, self.failure)

    def ready_engine(self) -> Engine:
        if self.engine is None:
            raise NotReady(f"the bundle failed to open: {self.failure}" if self.failure else "the bundle is still opening")
        return self.engine

    def start(self, question: str, **options) -> AnswerStream:
        """Checks, retrieves, and starts the decoding (raises QueueFull at once when the queue is full)."""
        engine = self.ready_engine()
        return batched_stream(engine, self.batcher, engine.prepare(question, **options),
                              deadline_s=self.config.timeout_s)


def batched_stream(engine: Engine, batcher: Batcher, prepared: Prepared, *, deadline_s: float) -> AnswerStream:
    """An AnswerStream for a prepared request: concat decodes in the shared batch; token and
    sequence modes already batch their k passages, so they run on the caller's thread. With passage
    KV the prompt goes in blocks, and the row counts its own reused and computed ones."""
    p = prepared
    if p.mode != "concat":
        return engine.answer_stream(p)
    prompt, length, truncated, used = concat_prompt(p.builder, p.question, p.passages, p.passage_kv is not None)
    tokens = batcher.submit(prompt, p.decoding, deadline_s=deadline_s)
    return engine.answer_stream(p, Run(tokens, length, truncated, used, tokens.blocks))
