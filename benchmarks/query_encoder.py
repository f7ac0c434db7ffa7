"""Query embedding, one question at a time, through each encoder graph given, in one process.

    python benchmarks/query_encoder.py --bundle B --graph fp32=PATH --graph int8=PATH \
        [--qa data/faq/dev.jsonl] [--rounds 3] [--json out.json]

The graphs take turns by round (the order reversed every other round), so a noisy machine
slows them alike. Each question is embedded alone, as the engine embeds a question, with the
bundle's tokenizer and maximum length. The first graph named is the reference for the cosine
figure. `ragrt export` caches the graphs it builds (fp32 and int8 for each encoder) under
~/.cache/ragrt/encoder-onnx/.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import QUESTIONS, machine, report  # noqa: E402


def run(bundle: str, graphs: dict[str, str], questions: list[str], rounds: int) -> dict:
    from ragrt.bundle.reader import Bundle
    from ragrt.retrieval.encoder import TextEncoder
    spec = Bundle.open(bundle).manifest.encoder
    encoders = {name: TextEncoder(path, Path(bundle) / spec.tokenizer, max_length=spec.max_length, dim=spec.dim)
                for name, path in graphs.items()}
    for e in encoders.values():
        e.embed_all(questions[:5])                      # first-call setup
    times: dict[str, list[float]] = {name: [] for name in encoders}
    for r in range(rounds):
        for name, e in (list(encoders.items()) if r % 2 == 0 else list(encoders.items())[::-1]):
            for q in questions:
                t0 = time.perf_counter()
                e.embed_all([q])
                times[name].append(time.perf_counter() - t0)
    reference = next(iter(encoders.values())).embed_all(questions)
    tokens = [len(next(iter(encoders.values())).tokenizer.encode(q).ids) for q in questions]
    return {"machine": machine(), "questions": len(questions), "mean_tokens": float(np.mean(tokens)),
            "rounds": rounds, "graphs": graphs,
            "ms_p50": {n: float(np.median(t) * 1e3) for n, t in times.items()},
            "questions_per_s": {n: float(len(t) / sum(t)) for n, t in times.items()},
            "min_cosine_to_first": {n: float((reference * e.embed_all(questions)).sum(1).min())
                                    for n, e in encoders.items()}}


def markdown(res: dict) -> str:
    rows = [f"| {n} | {res['ms_p50'][n]:.2f} | {res['questions_per_s'][n]:.1f} | {res['min_cosine_to_first'][n]:.5f} |"
            for n in res["graphs"]]
    return "\n".join([f"{res['questions']} questions ({res['mean_tokens']:.1f} tokens on average), {res['rounds']} rounds",
                      "", "| graph | ms per question, p50 | questions/s | min cosine to the first |", "|---|---:|---:|---:|",
                      *rows])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--graph", action="append", required=True, metavar="NAME=PATH", help="an encoder graph")
    ap.add_argument("--bundle", required=True, help="the bundle whose tokenizer and length the graphs take")
    ap.add_argument("--qa", help="JSONL of {question, ...}; default: the benchmarks' built-in questions")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    graphs = dict(g.split("=", 1) for g in args.graph)
    if args.qa:
        from ragrt.evaluate import read_qa
        questions = [item.question for item in read_qa(args.qa)]
    else:
        questions = QUESTIONS
    return report(run(args.bundle, graphs, questions, args.rounds), markdown, args.json)


if __name__ == "__main__":
    sys.exit(main())
