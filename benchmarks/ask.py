"""End-to-end `ask`: latency percentiles and answers/s at 1, 4 and 16 concurrent clients.

    python benchmarks/ask.py --bundle B [--clients 1,4,16] [--duration 30] [--max-new-tokens 32] [--json ask.json]

The real HTTP server (engine/serve/: FastAPI, the micro-batcher, uvicorn) runs in this
process on a loopback port; every client is a thread with its own HTTP connection that sends
its next question (the Python FAQ questions, in turn) to POST /v1/ask as soon as its answer
arrives, for `--duration` seconds per level. Requests already sent when the time is up finish
and count, so a level lasts until its last answer. Latency is the client's: request sent to
answer received (embedding, retrieval, queueing, prefill and decode). One server serves all
levels, after one warm-up answer; answers are short (`--max-new-tokens`) to keep a run short.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import QUESTIONS, memory, report, wait_ready  # noqa: E402


def run(bundle_path: str, *, clients=(1, 4, 16), duration_s: float = 30.0, max_new_tokens: int = 32,
        threads: int = 2, max_batch: int = 16, k: int | None = None) -> dict:
    import httpx

    from ragrt.serve.app import ServerConfig, background, create_app
    from load import run_clients
    app = create_app(ServerConfig(bundle=bundle_path, max_batch=max_batch, max_queue=max(64, max(clients)),
                                  threads=threads, timeout_s=600))
    levels = []
    with background(app) as base:
        wait_ready(base)
        warm = httpx.post(f"{base}/v1/ask", json={"question": QUESTIONS[0], "max_new_tokens": max_new_tokens},
                          timeout=600).json()
        for c in clients:
            lat, errors, tokens, wall = run_clients(base, clients=c, duration_s=duration_s,
                                                    max_new_tokens=max_new_tokens, questions=QUESTIONS, k=k)
            ms = np.array(lat) * 1e3 if lat else np.array([np.nan])
            level = {"clients": c, "wall_s": round(wall, 2), "answers": len(lat), "errors": errors,
                     "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
                     "p99_ms": float(np.percentile(ms, 99)), "qps": len(lat) / wall, "tokens_per_s": tokens / wall}
            print(f"[ask] {c:2d} clients: {len(lat)} answers, {errors} errors, p50 {level['p50_ms']:.0f} ms, "
                  f"p95 {level['p95_ms']:.0f} ms, p99 {level['p99_ms']:.0f} ms, {level['qps']:.2f} answers/s",
                  file=sys.stderr, flush=True)
            levels.append(level)
    return {"how": "real HTTP server in-process (FastAPI + micro-batcher), loopback clients",
            "max_new_tokens": max_new_tokens, "duration_s": duration_s, "threads": threads, "max_batch": max_batch,
            "k": k, "prompt_tokens": warm.get("prompt_tokens"), "levels": levels, "memory": memory()}


def markdown(res: dict) -> str:
    lines = [f"{res['how']}; answers of up to {res['max_new_tokens']} tokens, ~{res['prompt_tokens']} prompt tokens, "
             f"{res['duration_s']:.0f} s per level, {res['threads']} threads, max_batch {res['max_batch']}.", "",
             "| clients | answers | errors | p50 ms | p95 ms | p99 ms | answers/s | tokens/s | answers/s vs 1 client |",
             "|---|---|---|---|---|---|---|---|---|"]
    one = res["levels"][0]["qps"] if res["levels"] else 0
    for lv in res["levels"]:
        ratio = f"{lv['qps'] / one:.2f}×" if one else "–"
        lines.append(f"| {lv['clients']} | {lv['answers']} | {lv['errors']} | {lv['p50_ms']:.0f} | {lv['p95_ms']:.0f} | "
                     f"{lv['p99_ms']:.0f} | {lv['qps']:.3f} | {lv['tokens_per_s']:.1f} | {ratio} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True)
    p.add_argument("--clients", default="1,4,16")
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--k", type=int, default=None, help="passages per prompt (default: the bundle's)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    res = run(args.bundle, clients=[int(c) for c in args.clients.split(",")], duration_s=args.duration,
              max_new_tokens=args.max_new_tokens, threads=args.threads, max_batch=args.max_batch, k=args.k)
    return report(res, markdown, args.json)


if __name__ == "__main__":
    sys.exit(main())
