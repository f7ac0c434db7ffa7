"""The lazy passage KV cache under a stream of questions: hit rate, time to first token and RSS per budget.

    python benchmarks/passage_kv_cache.py --bundle B --qa data/faq/train.jsonl --qa data/faq/dev.jsonl \
        --budgets 64,256,1024 --requests 300 --json benchmarks/results/passage_kv_cache.json

Questions are drawn from the QA files with Zipf-distributed popularity (rank r asked with
probability proportional to 1 / r^s), the way a help desk sees the same few questions again and
again. Every request asks with passage KV on and one new token, so the time measured is the
time to the first token: embedding, retrieval, assembly, and computing the blocks that missed.
Each budget runs in its own process (a fresh cache, and its own peak RSS); the first budget's
process also measures full prefill on the same stream for reference.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def stream(questions: list[str], n: int, s: float, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(questions))          # which question is most popular: random
    weights = 1.0 / np.arange(1, len(questions) + 1) ** s
    picks = rng.choice(len(questions), size=n, p=weights / weights.sum())
    return [questions[order[i]] for i in picks]


def run_one(bundle: str, questions: list[str], budget_mb: int, passage_kv: str, threads: int) -> dict:
    from ragrt import Engine
    engine = Engine.open(bundle, device="cpu", threads=threads, passage_kv_cache_mb=budget_mb)
    engine.ask(questions[0], max_new_tokens=1, passage_kv="off")      # sessions warm, nothing cached
    ttft, reused, computed = [], 0, 0
    for q in questions:
        t0 = time.perf_counter()
        ans = engine.ask(q, max_new_tokens=1, passage_kv=passage_kv)
        ttft.append((time.perf_counter() - t0) * 1e3)
        if ans.passage_kv:
            reused += ans.passage_kv["reused"]
            computed += ans.passage_kv["computed"]
    cache = engine.passage_kv.cache if engine.passage_kv else None
    return {"budget_mb": budget_mb, "passage_kv": passage_kv, "requests": len(questions),
            "hit_rate": reused / max(reused + computed, 1), "blocks_reused": reused, "blocks_computed": computed,
            "evictions": cache.evictions if cache and passage_kv == "on" else 0,
            "cached_mb": cache.bytes / 2**20 if cache and passage_kv == "on" else 0.0,
            "ttft_ms_p50": float(np.percentile(ttft, 50)), "ttft_ms_p95": float(np.percentile(ttft, 95)),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--qa", action="append", required=True, type=Path, help="QA JSONL whose questions form the stream")
    ap.add_argument("--budgets", default="64,256,1024", help="cache budgets in MB, comma-separated")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--zipf", type=float, default=1.1, help="the popularity exponent s")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args._one:
        spec = json.loads(args._one)
        print(json.dumps(run_one(args.bundle, spec["questions"], spec["budget_mb"], spec["passage_kv"], args.threads)))
        return
    questions = [json.loads(line)["question"] for path in args.qa for line in path.read_text().splitlines() if line.strip()]
    asked = stream(questions, args.requests, args.zipf, args.seed)
    print(f"{len(asked)} requests over {len(set(asked))} distinct questions (of {len(questions)}), Zipf s={args.zipf}")
    runs = [("off", int(args.budgets.split(",")[0]))] + [("on", int(b)) for b in args.budgets.split(",")]
    rows = []
    for passage_kv, budget in runs:
        spec = json.dumps({"questions": asked, "budget_mb": budget, "passage_kv": passage_kv})
        out = subprocess.run([sys.executable, __file__, "--bundle", args.bundle, "--qa", str(args.qa[0]),
                              "--threads", str(args.threads), "--_one", spec], capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"budget {budget} MB failed:\n{out.stderr[-2000:]}")
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        label = "full prefill" if passage_kv == "off" else f"passage KV, {budget} MB cache"
        print(f"  {label:28s} hit rate {row['hit_rate']:.3f}  TTFT p50 {row['ttft_ms_p50']:.0f} ms  "
              f"p95 {row['ttft_ms_p95']:.0f} ms  cached {row['cached_mb']:.0f} MB  peak RSS {row['peak_rss_mb']:.0f} MB",
              flush=True)
    if args.json:
        from ragrt.bundle.atomic import atomic_write_text
        atomic_write_text(args.json, json.dumps({"requests": len(asked), "distinct": len(set(asked)),
                                                 "zipf": args.zipf, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
