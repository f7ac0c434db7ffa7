"""Server metrics for Prometheus, kept by `prometheus_client` in a registry of the app's own, so
several apps can live in one process. The batcher's figures are read when Prometheus scrapes."""
from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from ragrt.serve.batcher import BatcherStats

# Seconds; a RAG answer takes from tens of milliseconds (retrieve) to tens of seconds (long answers).
BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RATE_WINDOW_S = 10.0


class Metrics:
    """`observe` each request, record each `answered`, and `expose` the lot at scrape time.

    `ragrt_tokens_per_second` is a windowed gauge rather than a counter left to PromQL's rate():
    it reads right on one scrape, with no Prometheus history (a person curling /metrics)."""

    def __init__(self, batcher_stats: Callable[[], BatcherStats | None]):
        self.registry = CollectorRegistry()
        self._requests = Counter("ragrt_requests", "HTTP requests by method, path and status.",
                                 ["method", "path", "status"], registry=self.registry)
        self._seconds = Histogram("ragrt_request_seconds", "Request latency, until the last byte of the body.",
                                  ["path"], buckets=BUCKETS, registry=self.registry)
        self._batcher_stats = batcher_stats
        self._lock = threading.Lock()
        self._recent: deque[tuple[float, int]] = deque()                # (finish time, answer tokens)
        self.registry.register(self)

    def observe(self, method: str, path: str, status: int, seconds: float) -> None:
        self._requests.labels(method, path, str(status)).inc()
        self._seconds.labels(path).observe(seconds)

    def answered(self, new_tokens: int) -> None:
        with self._lock:
            self._recent.append((time.monotonic(), new_tokens))

    def expose(self, accept: str | None) -> tuple[bytes, str]:
        """The scrape body and its content type, in the format the `Accept` header prefers."""
        encode, content_type = choose_encoder(accept)
        return encode(self.registry), content_type

    def collect(self) -> Iterator[Metric]:
        """The figures read at scrape time (the registry calls this)."""
        with self._lock:
            while self._recent and self._recent[0][0] < time.monotonic() - RATE_WINDOW_S:
                self._recent.popleft()
            rate = sum(n for _, n in self._recent) / RATE_WINDOW_S
        yield GaugeMetricFamily("ragrt_tokens_per_second",
                                f"Answer tokens per second over the last {RATE_WINDOW_S:g} s.", value=rate)
        stats = self._batcher_stats()
        if stats is None:          # the bundle is still opening
            return
        yield CounterMetricFamily("ragrt_generated_tokens", "Tokens decoded by the batcher.", value=stats.tokens)
        yield CounterMetricFamily("ragrt_decoder_steps", "Decoder calls (prefills and steps) by the batcher.",
                                  value=stats.steps)
        seconds = CounterMetricFamily("ragrt_decoder_seconds", "Seconds the batcher spent prefilling and stepping.",
                                      labels=["phase"])
        seconds.add_metric(["prefill"], stats.prefill_s)
        seconds.add_metric(["step"], stats.step_s)
        yield seconds
        yield GaugeMetricFamily("ragrt_queue_depth", "Requests waiting for a decoder batch slot.", value=stats.waiting)
        yield GaugeMetricFamily("ragrt_batch_size", "Requests decoding together now.", value=stats.active)
