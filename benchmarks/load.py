"""Load test: N concurrent HTTP clients ask the server for D seconds, with micro-batching and without.

    python benchmarks/load.py --bundle BUNDLE --clients 16 --duration 60 --json load.json
    python benchmarks/load.py --bundle BUNDLE --passage-kv [--also OTHER ...] --json load.json

Both runs use the same server code, bundle, questions, clients and duration; only
`max_batch` differs (16 against 1, which decodes one answer at a time). With --passage-kv,
both runs are batched and the requests differ: passage KV off, then on (the server's blocks
start cold, so the second run's misses count, unless --warm asks each question once first);
--also adds a run with passage KV on (with --also-off, off too) for each other bundle (the
same corpus exported another way, say), all against the first kv-off run.
Each client sends its next question as soon
as its answer arrives. Reported: requests, errors (any non-200 or transport failure), latency
p50/p95/p99 and answers/s.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import QUESTIONS, wait_ready  # noqa: E402,F401  (QUESTIONS lived here; kept importable)
from ragrt.bundle.atomic import atomic_write_text  # noqa: E402
from ragrt.serve.app import ServerConfig, background, create_app  # noqa: E402



@dataclass(frozen=True)
class LoadResult:
    label: str
    max_batch: int
    clients: int
    duration_s: float
    requests: int
    errors: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    answers_per_s: float
    tokens_per_s: float
    prefill_share: float           # of the wall time, the batcher prefilling admitted prompts
    step_share: float              # of the wall time, the batcher stepping its rows
    mean_batch: float              # tokens per step: rows decoding together, on average


def run_clients(base: str, *, clients: int, duration_s: float, max_new_tokens: int | None,
                questions: list[str], k: int | None = None, passage_kv: str | None = None, mode: str | None = None
                ) -> tuple[list[float], int, int, float]:
    """Latencies (s) of answered requests, error count, answer tokens, and the measured wall time."""
    latencies: list[float] = []
    errors, tokens = [0], [0]
    lock = threading.Lock()
    start = time.monotonic()
    stop_at = start + duration_s

    def client(i: int) -> None:
        n = i
        with httpx.Client(timeout=600) as http:
            while time.monotonic() < stop_at:
                body = {"question": questions[n % len(questions)]}
                if max_new_tokens is not None:
                    body["max_new_tokens"] = max_new_tokens
                if k is not None:
                    body["k"] = k
                if passage_kv is not None:
                    body["passage_kv"] = passage_kv
                if mode is not None:
                    body["mode"] = mode
                n += clients
                t0 = time.monotonic()
                try:
                    r = http.post(f"{base}/v1/ask", json=body)
                    ok = r.status_code == 200
                    new = r.json()["new_tokens"] if ok else 0
                except httpx.HTTPError:
                    ok, new = False, 0
                with lock:
                    if ok:
                        latencies.append(time.monotonic() - t0)
                        tokens[0] += new
                    else:
                        errors[0] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, errors[0], tokens[0], time.monotonic() - start


def measure(bundle: str, *, max_batch: int, clients: int, duration_s: float, max_new_tokens: int | None,
            threads: int = 0, questions: list[str] = QUESTIONS, label: str = "", k: int | None = None,
            passage_kv: str | None = None, warm: bool = False, mode: str | None = None) -> LoadResult:
    app = create_app(ServerConfig(bundle=bundle, max_batch=max_batch, max_queue=max(64, clients), threads=threads,
                                  timeout_s=600))
    with background(app) as base:
        wait_ready(base)
        # One answer first, so neither run pays for onnxruntime's first-call setup; `warm`: one
        # first token per question, so passage KV starts with their blocks computed.
        for q in (questions if warm else questions[:1]):
            body = {"question": q, "max_new_tokens": 4 if not warm else 1}
            if warm and passage_kv is not None:
                body["passage_kv"] = passage_kv
            if k is not None:
                body["k"] = k
            if mode is not None:
                body["mode"] = mode
            httpx.post(f"{base}/v1/ask", json=body, timeout=600)
        batcher = app.state.services.batcher
        before = batcher.stats()
        lat, errors, tokens, wall = run_clients(base, clients=clients, duration_s=duration_s,
                                                max_new_tokens=max_new_tokens, questions=questions, k=k,
                                                passage_kv=passage_kv, mode=mode)
        after = batcher.stats()
    steps = after.steps - before.steps
    ms = np.array(lat) * 1e3 if lat else np.array([np.nan])
    return LoadResult(label or f"max_batch={max_batch}", max_batch, clients, round(wall, 1), len(lat) + errors,
                      errors, round(float(np.percentile(ms, 50)), 1), round(float(np.percentile(ms, 95)), 1),
                      round(float(np.percentile(ms, 99)), 1),
                      round(len(lat) / wall, 3), round(tokens / wall, 1),
                      round((after.prefill_s - before.prefill_s) / wall, 3), round((after.step_s - before.step_s) / wall, 3),
                      round((after.tokens - before.tokens) / max(steps, 1), 2))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load per run")
    p.add_argument("--max-new-tokens", type=int, default=None, help="answer limit (default: the bundle's)")
    p.add_argument("--k", type=int, default=None, help="passages per prompt (default: the bundle's)")
    p.add_argument("--max-batch", type=int, default=16, help="the batched run's batch size")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: all cores)")
    p.add_argument("--mode", default=None,
                   help="answer mode of every request (default: the bundle's; make demo's bundle answers by "
                        "extract, so ask for concat to load its generator)")
    p.add_argument("--passage-kv", action="store_true",
                   help="compare passage KV off and on (both batched) instead of batched and unbatched")
    p.add_argument("--warm", action="store_true",
                   help="ask each question once before timing, so passage KV runs start with their blocks cached "
                        "(the steady state of a server whose questions repeat); default: cold")
    p.add_argument("--also", nargs="+", default=[], metavar="BUNDLE",
                   help="with --passage-kv: more bundles to run with passage KV on, in the same run")
    p.add_argument("--also-off", action="store_true",
                   help="run the --also bundles with passage KV off too (each against the first run, all the same)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.also and not args.passage_kv:
        p.error("--also needs --passage-kv")
    if args.also_off and not args.also:
        p.error("--also-off needs --also")
    runs = (((args.bundle, "kv off", args.max_batch, "off"), (args.bundle, "kv on", args.max_batch, "on"),
             *((b, f"kv {kv} {Path(b).name}", args.max_batch, kv) for b in args.also
               for kv in (("off", "on") if args.also_off else ("on",)))) if args.passage_kv
            else ((args.bundle, "batched", args.max_batch, None), (args.bundle, "unbatched", 1, None)))
    results = []
    for bundle, label, batch, passage_kv in runs:
        r = measure(bundle, max_batch=batch, clients=args.clients, duration_s=args.duration,
                    max_new_tokens=args.max_new_tokens, threads=args.threads, label=label, k=args.k,
                    passage_kv=passage_kv, warm=args.warm, mode=args.mode)
        print(f"{r.label:10s} max_batch={r.max_batch:<3d} clients={r.clients} {r.duration_s:.0f} s: "
              f"{r.requests} requests, {r.errors} errors, p50 {r.p50_ms:.0f} ms, p95 {r.p95_ms:.0f} ms, "
              f"p99 {r.p99_ms:.0f} ms, {r.answers_per_s:.2f} answers/s, {r.tokens_per_s:.1f} tokens/s; batcher "
              f"prefilling {r.prefill_share:.0%} and stepping {r.step_share:.0%} of the time, "
              f"{r.mean_batch:.1f} tokens per decoder call", flush=True)
        results.append(r)
    base, better = (results[0], results[1:]) if args.passage_kv else (results[1], results[:1])
    for r in better:
        print(f"{r.label} against {base.label}: {r.answers_per_s / max(base.answers_per_s, 1e-9):.2f}x the answers/s")
    if args.json:
        atomic_write_text(args.json, json.dumps([asdict(r) for r in results], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
