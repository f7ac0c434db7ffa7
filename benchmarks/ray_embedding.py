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

Every configuration runs `--rounds` times, the configurations alternating, and the median is
reported. `per_thread` is passages/s divided by the threads at work (A x T); for Ray,
`steady_per_thread` is the same after the pool's first round of batches (one per actor), so
without the pool's start: the per-worker figure that carries over to a cluster. (The local
timing starts after its session is open.) `max_abs_diff` is the largest difference of any vector
component from the first configuration's vectors.

With `--passage-kv BUNDLE`, the same configurations also write `--passage-kv all`'s store for the
bundle's first `--blocks` passages (rows "local kv" and "ray kv", in blocks/s; `max_abs_diff` is
then over the first block, float16): a block is a generator pass, far more work per passage
than embedding, so the same arithmetic gives the cluster's block rate.

Scaling to N nodes of C cores, actors of T threads: N x C / T actors, so the embedding rate is
about N x C x steady_per_thread(Ray, T), as long as the driver keeps up. The driver receives, per
passage, its text and a dim x 4-byte vector (384-d: 1.5 KB) and writes them into one array;
gathering runs at hundreds of MB/s, so it bounds the rate only past ~10^5 passages/s. Time for
P passages: P / (N x C x steady_per_thread) + the pool's start (a few seconds per actor, in parallel)
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


def run_ray(docs, files: dict, actors: int, threads: int) -> tuple[float, np.ndarray, float]:
    """Seconds, vectors and the pool's steady rate (passages/s after the first batch)."""
    from ragrt.export.ray_embed import RayEmbedding, embed_on_ray
    t0 = time.perf_counter()
    out = embed_on_ray(docs, RayEmbedding(actors=actors, threads=threads), **files, max_tokens=128, overlap=32,
                       progress=False)
    return time.perf_counter() - t0, out.vectors, out.steady_rate


def bundle_passages(bundle: Path, limit: int):
    from ragrt.bundle.reader import Bundle
    from ragrt.retrieval.passages import PassageStore
    gen = Bundle.open(bundle).generation
    store = PassageStore.open(gen.path, gen.spec.passages)
    return [store.get(i) for i in range(min(limit, len(store)))]


def run_blocks(bundle: Path, passages, actors: int, threads: int, on_ray: bool) -> tuple[float, np.ndarray]:
    """`--passage-kv all`'s store of `passages`, written locally with `threads` threads or on Ray;
    returns the seconds and the first block (the check that both paths agree)."""
    import tempfile

    from ragrt.bundle.reader import Bundle
    from ragrt.decoding.blockstore import BlockStore, graph_id, write_store
    from ragrt.export.ray_passage_kv import RayBlocks, blocks_on_ray
    from ragrt.runtime.sessions import SessionConfig
    m = Bundle.open(bundle).manifest
    compute = (blocks_on_ray(RayBlocks(actors=actors, threads=threads), root=bundle, spec=m.generator,
                             graph_id=graph_id(m))
               if on_ray else None)
    with tempfile.TemporaryDirectory(prefix="ragrt-kv-bench-") as tmp:
        t0 = time.perf_counter()
        write_store(bundle, m, Path(tmp), passages, session_config=SessionConfig(device="cpu", threads=threads),
                    compute=compute)
        seconds = time.perf_counter() - t0
        store = BlockStore.open(Path(tmp))
        first = np.array(store.stored(sorted(store.keys())[0]), dtype=np.float32)
    return seconds, first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", type=Path, default=ROOT / "data" / "faq" / "corpus.jsonl")
    ap.add_argument("--limit", type=int, default=2000, help="passages to embed (at least; whole documents)")
    ap.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray cluster")
    ap.add_argument("--local", default="1,2", help="thread counts of the local runs")
    ap.add_argument("--ray", default="1x1,1x2,2x1", help="ACTORSxTHREADS of the Ray runs")
    ap.add_argument("--rounds", type=int, default=3, help="runs of every configuration, alternating; medians reported")
    ap.add_argument("--passage-kv", type=Path, default=None, metavar="BUNDLE",
                    help="also time `--passage-kv all` on this bundle's first --blocks passages, locally and on Ray")
    ap.add_argument("--blocks", type=int, default=64, help="passages whose blocks --passage-kv computes")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import ray
    from tokenizers import Tokenizer

    from ragrt.bundle.atomic import atomic_write_text
    from ragrt.export.models import encoder_checkpoint
    from ragrt.export.pipeline import encoder_graphs
    enc_dir = encoder_graphs(encoder_checkpoint(None))
    meta = json.loads((enc_dir / "meta.json").read_text())
    files = {"model": enc_dir / "fp32" / "model.onnx", "tokenizer": enc_dir / "tokenizer.json",
             "max_length": meta["max_length"], "dim": meta["dim"]}
    docs = first_documents(args.corpus, Tokenizer.from_file(str(files["tokenizer"])), args.limit)

    configs = [("local", 1, int(t)) for t in args.local.split(",") if t]
    configs += [("ray", *(int(x) for x in spec.split("x"))) for spec in args.ray.split(",") if spec]
    kv_passages = bundle_passages(args.passage_kv, args.blocks) if args.passage_kv else []
    if kv_passages:
        configs += [(f"{path} kv", actors, threads) for path, actors, threads in configs]
    seconds: dict[tuple, list[float]] = {c: [] for c in configs}
    steady: dict[tuple, list[float]] = {c: [] for c in configs}
    vectors: dict[tuple, np.ndarray] = {}
    # Rounds alternate the paths, so a noisy stretch of a shared machine hits both alike.
    ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="WARNING")
    try:
        for _ in range(args.rounds):
            for c in configs:
                path, actors, threads = c
                if path.endswith(" kv"):
                    s, vectors[c] = run_blocks(args.passage_kv, kv_passages, actors, threads, path == "ray kv")
                elif path == "local":
                    s, vectors[c] = run_local(docs, files, threads)
                else:
                    s, vectors[c], rate = run_ray(docs, files, actors, threads)
                    steady[c].append(rate)
                seconds[c].append(s)
    finally:
        ray.shutdown()

    passages = len(vectors[configs[0]])
    results = []
    for c in configs:
        path, actors, threads = c
        kv = path.endswith(" kv")
        reference = vectors[next(x for x in configs if x[0].endswith(" kv") == kv)]
        median = float(np.median(seconds[c]))
        rate = (len(kv_passages) if kv else passages) / median
        results.append({"path": path, "actors": actors, "threads": threads, "seconds": round(median, 2),
                        "rounds": [round(s, 2) for s in seconds[c]], "passages_per_s": round(rate, 1),
                        "per_thread": round(rate / (actors * threads), 1),
                        "max_abs_diff": float(np.abs(vectors[c] - reference).max())})
        if steady[c]:
            steady_rate = float(np.median(steady[c]))
            results[-1].update(steady_passages_per_s=round(steady_rate, 1),
                               steady_per_thread=round(steady_rate / (actors * threads), 1))
        print(f"{path:8} {actors} x {threads} threads: {median:7.2f} s (median of {len(seconds[c])}), "
              f"{rate:7.1f} {'blocks' if kv else 'passages'}/s, {results[-1]['per_thread']:6.1f} per thread, "
              f"max |diff| {results[-1]['max_abs_diff']:.1e}"
              + (f"; after the first round {results[-1]['steady_per_thread']:6.1f} per thread" if steady[c] else ""))
    report = {"corpus": str(args.corpus), "documents": len(docs), "passages": passages, "cpus": args.cpus,
              "cores": os.cpu_count(), "passage_kv_bundle": str(args.passage_kv) if kv_passages else None,
              "passage_kv_blocks": len(kv_passages), "runs": results}
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
