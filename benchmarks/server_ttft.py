"""Time to first token through the server: POST /v1/ask streamed, passage KV on (blocks cached) against off.

    python benchmarks/server_ttft.py --bundle B [--k 5] [--rounds 3] [--json server_ttft.json]

The real HTTP server (engine/serve/) runs in this process on a loopback port, one client at a
time. Each question is asked once with passage KV on to compute its blocks; then, for every
round and question, it is asked with passage KV off and on, in an order that alternates, so the
two see the same machine. Time to first token is the client's: request sent to the first
`token` event, so it counts everything before it (embedding, retrieval, block assembly, the
repair and the tail's prefill, or full prefill, and the first step). Mode concat: the
generator answers, whatever the bundle's default mode. The server's own `timings_ms` of the
cached asks are kept too.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import QUESTIONS, report, wait_ready  # noqa: E402


def first_token_ms(client, base: str, question: str, k: int, passage_kv: str) -> tuple[float, dict]:
    """(ms to the first token event, the final answer event's body)."""
    body = {"question": question, "k": k, "mode": "concat", "passage_kv": passage_kv, "stream": True,
            "max_new_tokens": 8}
    t0, first, answer, event = time.perf_counter(), None, {}, None
    with client.stream("POST", f"{base}/v1/ask", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"/v1/ask answered {r.status_code}: {r.read()[:200]!r}")
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                if event == "token" and first is None:
                    first = (time.perf_counter() - t0) * 1e3
                elif event == "answer":
                    answer = json.loads(line[6:])
    if first is None:
        raise RuntimeError(f"no token event for {question!r}")
    return first, answer


def run(bundle: str, *, k: int, rounds: int, threads: int) -> dict:
    import httpx

    from ragrt.serve.app import ServerConfig, background, create_app
    app = create_app(ServerConfig(bundle=bundle, threads=threads, timeout_s=600))
    ttft: dict[str, list[float]] = {"off": [], "on": []}
    timings_on: list[dict] = []                  # the server's own, of the cached asks
    reused = computed = 0
    with background(app) as base, httpx.Client(timeout=600) as client:
        wait_ready(base)
        for q in QUESTIONS:                      # computes every question's blocks
            first_token_ms(client, base, q, k, "on")
        for rnd in range(rounds):
            for i, q in enumerate(QUESTIONS):
                for mode in (("off", "on") if (rnd + i) % 2 == 0 else ("on", "off")):
                    ms, answer = first_token_ms(client, base, q, k, mode)
                    ttft[mode].append(ms)
                    if mode == "on":
                        timings_on.append(answer["timings_ms"])
                        reused += answer["passage_kv"]["reused"]
                        computed += answer["passage_kv"]["computed"]
    p50 = {m: float(np.median(v)) for m, v in ttft.items()}
    steps = sorted({name for t in timings_on for name in t})
    return {"bundle": bundle, "k": k, "rounds": rounds, "questions": len(QUESTIONS),
            "ttft_ms_p50": p50, "ttft_ms_p95": {m: float(np.percentile(v, 95)) for m, v in ttft.items()},
            "ratio_off_over_on": p50["off"] / p50["on"], "blocks_reused": reused, "blocks_computed": computed,
            "server_timings_ms_p50_on": {s: float(np.median([t.get(s, 0.0) for t in timings_on])) for s in steps},
            "ttft_ms": ttft}


def markdown(res: dict) -> str:
    p50, p95 = res["ttft_ms_p50"], res["ttft_ms_p95"]
    steps = ", ".join(f"{s} {v:.0f}" for s, v in res["server_timings_ms_p50_on"].items())
    return "\n".join([
        f"`{res['bundle']}`, k={res['k']}, {res['questions']} questions x {res['rounds']} rounds, /v1/ask streamed",
        "", "| passage KV | TTFT p50 | TTFT p95 |", "|---|---:|---:|",
        f"| off (full prefill) | {p50['off']:.0f} ms | {p95['off']:.0f} ms |",
        f"| on (blocks cached) | {p50['on']:.0f} ms | {p95['on']:.0f} ms |",
        "", f"full prefill / cached: **{res['ratio_off_over_on']:.2f}x**; blocks reused {res['blocks_reused']}, "
            f"computed {res['blocks_computed']}; server timings with passage KV, p50 ms: {steps}"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True)
    p.add_argument("--k", type=int, default=5, help="passages per prompt (default 5)")
    p.add_argument("--rounds", type=int, default=3, help="times each question is asked each way")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime threads")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    return report(run(args.bundle, k=args.k, rounds=args.rounds, threads=args.threads), markdown, args.json)


if __name__ == "__main__":
    sys.exit(main())
