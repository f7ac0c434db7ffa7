"""Server metrics in the Prometheus text format (version 0.0.4), with no client library."""
from __future__ import annotations

import bisect
import threading
import time
from collections import Counter, deque

from ragrt.serve.batcher import BatcherStats

# Seconds; a RAG answer takes from tens of milliseconds (retrieve) to tens of seconds (long answers).
BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RATE_WINDOW_S = 10.0


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: Counter[tuple[str, str, int]] = Counter()       # (method, path, status)
        self._buckets: dict[str, list[int]] = {}                        # path -> per-bucket counts, cumulated at render
        self._sum: Counter[str] = Counter()
        self._count: Counter[str] = Counter()
        self._recent: deque[tuple[float, int]] = deque()                # (finish time, answer tokens)

    def observe(self, method: str, path: str, status: int, seconds: float) -> None:
        with self._lock:
            self._requests[(method, path, status)] += 1
            counts = self._buckets.setdefault(path, [0] * (len(BUCKETS) + 1))
            counts[bisect.bisect_left(BUCKETS, seconds)] += 1
            self._sum[path] += seconds
            self._count[path] += 1

    def answered(self, new_tokens: int) -> None:
        with self._lock:
            self._recent.append((time.monotonic(), new_tokens))

    def render(self, stats: BatcherStats | None) -> str:
        now = time.monotonic()
        lines = ["# HELP ragrt_requests_total HTTP requests by method, path and status.",
                 "# TYPE ragrt_requests_total counter"]
        with self._lock:
            for (method, path, status), n in sorted(self._requests.items()):
                lines.append(f'ragrt_requests_total{{method="{method}",path="{path}",status="{status}"}} {n}')
            lines += ["# HELP ragrt_request_seconds Request latency, until the last byte of the body.",
                      "# TYPE ragrt_request_seconds histogram"]
            for path, counts in sorted(self._buckets.items()):
                total = 0
                for bound, n in zip([*map(str, BUCKETS), "+Inf"], counts):
                    total += n
                    lines.append(f'ragrt_request_seconds_bucket{{path="{path}",le="{bound}"}} {total}')
                lines.append(f'ragrt_request_seconds_sum{{path="{path}"}} {self._sum[path]:.6f}')
                lines.append(f'ragrt_request_seconds_count{{path="{path}"}} {self._count[path]}')
            while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
                self._recent.popleft()
            rate = sum(n for _, n in self._recent) / RATE_WINDOW_S
        lines += [f"# HELP ragrt_tokens_per_second Answer tokens per second over the last {RATE_WINDOW_S:g} s.",
                  "# TYPE ragrt_tokens_per_second gauge", f"ragrt_tokens_per_second {rate:.3f}"]
        if stats is not None:
            lines += ["# HELP ragrt_generated_tokens_total Tokens decoded by the batcher.",
                      "# TYPE ragrt_generated_tokens_total counter", f"ragrt_generated_tokens_total {stats.tokens}",
                      "# HELP ragrt_queue_depth Requests waiting for a decoder batch slot.",
                      "# TYPE ragrt_queue_depth gauge", f"ragrt_queue_depth {stats.waiting}",
                      "# HELP ragrt_batch_size Requests decoding together now.",
                      "# TYPE ragrt_batch_size gauge", f"ragrt_batch_size {stats.active}"]
        return "\n".join(lines) + "\n"
