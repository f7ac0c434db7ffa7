"""Passage embedding on Ray (`ragrt export --ray`) against the local export, per worker thread.

    python benchmarks/ray_embedding.py --corpus data/faq/corpus.jsonl --limit 2000 --json ray_embedding.json

The first documents of the corpus that make at least `--limit` passages (the export's chunking:
128 tokens, overlap 32) are chunked and embedded with the packaged encoder's fp32 graph, each
configuration in turn on the same documents:

- local, T threads: `chunk_documents` + `embed_passages`, one onnxruntime session of T threads
  (what `ragrt export` does, without its embedding cache);
- Ray, A actors x T threads: `embed_on_ray` on a local cluster of `--cpus` CPUs started once,
  so the time covers Ray Data's chunking tasks, starting the actor pool (each actor opens the
  graph), the transfers and the driver's gathering, not the cluster's start.

`per_thread` is passages/s divided by the threads at work (A x T), the figure that carries over
to a cluster; `max_abs_diff` is the largest difference of any vector component from the first
local run's vectors.

Scaling to N nodes of C cores, actors of T threads: N x C / T actors, so the embedding rate is
about N x C x per_thread(Ray, T), as long as the driver keeps up. The driver receives, per
passage, its text and a dim x 4-byte vector (384-d: 1.5 KB) and writes them into one array;
gathering runs at hundreds of MB/s, so it bounds the rate only past ~10^5 passages/s. Time for
P passages: P / (N x C x per_thread) + the pool's start (a few seconds per actor, in parallel)
+ chunking (tokenizing, spread over the same CPUs). Example: per_thread 40 passages/s, 4 nodes
of 16 cores, 1 thread per actor: 2,560 passages/s, a 1M-passage corpus in ~6.5 min of
embedding; one 16-core machine alone: ~26 min. The index build after it stays on the driver.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT  # noqa: E402,F401  (puts the repository on sys.path)


def first_documents(corpus: Path, tokenizer, limit: int):
    """The corpus's first documents that chunk into at least `limit` passages."""
    from ragrt.corpus.documents import chunk_documents, read_documents
    docs, count = [], 0
    for doc in read_documents(corpus):
        docs.append(doc)
        count += sum(1 for _ in chunk_documents([doc], tokenizer, max_tokens=128, overlap=32))
        if count >= limit:
            break
    return docs


def run_local(docs, files: dict, threads: int) -> tuple[float, np.ndarray]:
    from tokenizers import Tokenizer

    from ragrt.corpus.documents import chunk_documents
    from ragrt.export.index import embed_passages
    from ragrt.retrieval.encoder import TextEncoder
    from ragrt.runtime.sessions import SessionConfig
    encoder = TextEncoder(files["model"], files["tokenizer"], max_length=files["max_length"], dim=files["dim"],
                          session_config=SessionConfig(threads=threads))
    t0 = time.perf_counter()
    tok = Tokenizer.from_file(str(files["tokenizer"]))
    passages = list(chunk_documents(docs, tok, max_tokens=128, overlap=32))
    vectors = embed_passages(passages, encoder, progress=False)
    return time.perf_counter() - t0, vectors


def run_ray(docs, files: dict, actors: int, threads: int) -> tuple[float, np.ndarray]:
    from ragrt.export.ray_embed import RayEmbedding, embed_on_ray
    t0 = time.perf_counter()
    out = embed_on_ray(docs, RayEmbedding(actors=actors, threads=threads), **files, max_tokens=128, overlap=32,
                       progress=False)
    return time.perf_counter() - t0, out.vectors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", type=Path, default=ROOT / "data" / "faq" / "corpus.jsonl")
    ap.add_argument("--limit", type=int, default=2000, help="passages to embed (at least; whole documents)")
    ap.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray cluster")
    ap.add_argument("--local", default="1,2", help="thread counts of the local runs")
    ap.add_argument("--ray", default="1x2,2x1", help="ACTORSxTHREADS of the Ray runs")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import ray
    from tokenizers import Tokenizer

    from ragrt.export.models import encoder_checkpoint
    from ragrt.export.pipeline import encoder_graphs
    enc_dir = encoder_graphs(encoder_checkpoint(None))
    meta = json.loads((enc_dir / "meta.json").read_text())
    files = {"model": enc_dir / "fp32" / "model.onnx", "tokenizer": enc_dir / "tokenizer.json",
             "max_length": meta["max_length"], "dim": meta["dim"]}
    docs = first_documents(args.corpus, Tokenizer.from_file(str(files["tokenizer"])), args.limit)

    runs, reference = [], None
    for threads in (int(t) for t in args.local.split(",") if t):
        seconds, vectors = run_local(docs, files, threads)
        runs.append({"path": "local", "actors": 1, "threads": threads, "seconds": seconds, "vectors": vectors})
        reference = vectors if reference is None else reference
    ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="WARNING")
    try:
        for spec in (s for s in args.ray.split(",") if s):
            actors, threads = (int(x) for x in spec.split("x"))
            seconds, vectors = run_ray(docs, files, actors, threads)
            runs.append({"path": "ray", "actors": actors, "threads": threads, "seconds": seconds, "vectors": vectors})
    finally:
        ray.shutdown()

    passages = len(runs[0]["vectors"])
    reference = reference if reference is not None else runs[0]["vectors"]
    results = []
    for r in runs:
        rate = passages / r["seconds"]
        results.append({"path": r["path"], "actors": r["actors"], "threads": r["threads"],
                        "seconds": round(r["seconds"], 2), "passages_per_s": round(rate, 1),
                        "per_thread": round(rate / (r["actors"] * r["threads"]), 1),
                        "max_abs_diff": float(np.abs(r["vectors"] - reference).max())})
        print(f"{r['path']:5} {r['actors']} x {r['threads']} threads: {results[-1]['seconds']:7.2f} s, "
              f"{rate:7.1f} passages/s, {results[-1]['per_thread']:6.1f} per thread, "
              f"max |diff| {results[-1]['max_abs_diff']:.1e}")
    report = {"corpus": str(args.corpus), "documents": len(docs), "passages": passages, "cpus": args.cpus,
              "cores": os.cpu_count(), "runs": results}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
