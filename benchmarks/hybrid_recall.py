"""Recall of dense, BM25 and hybrid retrieval on QA splits, without answering (issue 28, item 5).

    python benchmarks/hybrid_recall.py --bundle bundles/demo --qa dev=data/faq/dev.jsonl test=data/faq/test.jsonl \
        --out benchmarks/results/hybrid_recall.json

Each question is retrieved at depth 10 by each retrieval the bundle offers, and scored as `ragrt eval`
scores retrieval (`ragrt.evaluate.retrieval_recall`); `--rrf-k` and `--candidates` try other fusion
settings than the engine's (the export's choice is made with the defaults). The time is the search
alone at k=5 (the question's embedding, the same for every retrieval, left out), its p50 over the questions.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import ragrt.retrieval.bm25 as bm25
import ragrt.retrieval.retriever as retriever
from ragrt import Engine
from ragrt.bundle.atomic import atomic_write_text
from ragrt.evaluate import read_qa, retrieval_recall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--qa", nargs="+", required=True, metavar="NAME=PATH")
    ap.add_argument("--rrf-k", type=int, nargs="+", default=[bm25.RRF_K])
    ap.add_argument("--candidates", type=int, nargs="+", default=[retriever.CANDIDATES])
    ap.add_argument("--out", default=None, help="write the figures here as JSON")
    args = ap.parse_args()
    engine = Engine.open(args.bundle)
    splits = {name: read_qa(path) for name, path in (spec.split("=", 1) for spec in args.qa)}
    rows = []
    for rrf_k in args.rrf_k:
        for candidates in args.candidates:
            bm25.RRF_K, retriever.CANDIDATES = rrf_k, candidates
            for name, items in splits.items():
                for method, figures in retrieval_recall(engine, items).items():
                    if method != "hybrid" and (rrf_k, candidates) != (args.rrf_k[0], args.candidates[0]):
                        continue       # only fusion depends on these settings
                    ms = search_ms(engine, items, method)
                    rows.append({"split": name, "questions": len(items), "retrieval": method, "rrf_k": rrf_k,
                                 "candidates": candidates, **figures, "search_ms_p50": round(ms, 2)})
                    print(f"{name:<5} {method:<7} rrf_k {rrf_k:<3} candidates {candidates:<3} "
                          + "  ".join(f"{k} {v:.3f}" for k, v in figures.items()) + f"  search p50 {ms:.1f} ms")
    if args.out:
        atomic_write_text(Path(args.out), json.dumps({"bundle": args.bundle, "rows": rows}, indent=2) + "\n")


def search_ms(engine: Engine, items, method: str) -> float:
    retriever = engine.retriever
    vectors = engine.encoder.embed_all([qa.question for qa in items])
    times = []
    for qa, v in zip(items, vectors):
        t0 = time.perf_counter()
        retriever.find(qa.question, v, 5, method)
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.percentile(times, 50))


if __name__ == "__main__":
    main()
