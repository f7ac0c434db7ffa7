"""Retrieval: the bundle's USearch index, memory-mapped, against numpy exact search and faiss HNSW.

    python benchmarks/retrieval.py --bundle B --corpus docs.jsonl --sizes 100000,1000000 --json retrieval.json

Vectors are real-derived. A few thousand real passages (chunked from `--corpus`, e.g. the output
of `ragrt data python-docs`, the way the bundle chunks; without `--corpus`, the bundle's own
passages) are embedded with the bundle's encoder. Each of the N indexed vectors is then a
random convex combination of 2 or 3 of those embeddings (Dirichlet(1) weights) plus Gaussian
noise of norm about NOISE, L2-normalised: they keep the real embeddings' anisotropy and
cluster structure, which uniform random vectors would not. The queries are 1000 more vectors
drawn the same way from another seed (held out: none is in the index). Ground truth is numpy
exact search (cosine = dot product of unit vectors).

Engines, each measured in its own spawned process (so its RSS is its own):
- numpy exact: the vectors loaded in RAM (float32), one matmul + argpartition per query.
- usearch view: built and opened by engine/retrieval/index.py, as export and the engine do (cos,
  the bundle's dtype, connectivity and expansion), saved, then memory-mapped by `open_index`
  (readahead off: engine/runtime/madvise.py).
- faiss HNSW: IndexHNSWFlat, inner product, M = connectivity, efConstruction = expansion_add,
  efSearch = expansion_search (faiss's level 0 has 2M links, as usearch's has 2 x connectivity).

QPS "batch 1" sends queries one at a time; "batched" sends all of them in one call with
`--threads` threads. RSS is read from /proc/self/status after loading and querying; for the
memory-mapped view, file-backed pages (RssFile) are the index pages the queries touched.
Derived vectors, ground truth and indexes are cached under ~/.cache/ragrt/bench.

With --memory-cap MIB each engine's queries run in a memory cgroup of that size (root or a
delegated cgroup needed), after the engine's data file is dropped from the page cache so the
pages it reads are charged to the cap. A memory-mapped index then keeps only what fits, the
kernel dropping clean pages and reading them again on demand (the MiB read from storage are
reported); an engine that must hold its data privately is killed. The expansion_search sweep
is skipped.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (CACHE, CgroupError, atomic_target, digest, drop_page_cache, in_cgroup, in_subprocess,  # noqa: E402
                    limit_threads, mapped_mib, memory, memory_cgroup, oom_kills, report, save_json, save_npy)
from concurrent.futures.process import BrokenProcessPool  # noqa: E402

RECIPE = "v1: convex combination of 2-3 real embeddings, Dirichlet(1) weights, + N(0, (NOISE^2)/d) noise, L2-normalised"
NOISE = 0.05
K = 10
SWEEP = (32, 64, 128, 256, 512)


def _tqdm(**kw):
    from tqdm import tqdm
    return tqdm(mininterval=2.0, file=sys.stderr, **kw)


# --- the vectors --------------------------------------------------------------------------------

def base_texts(bundle, corpus: str | None, n_base: int, seed: int = 0) -> tuple[list[str], str]:
    """Real passage texts: chunked from `corpus` as the bundle chunks, or the bundle's own passages."""
    from ragrt.retrieval.passages import passage_text
    if corpus:
        from ragrt.corpus.documents import chunk_documents, read_documents
        from ragrt.retrieval.encoder import load_tokenizer
        tok = load_tokenizer(bundle.path(bundle.manifest.encoder.tokenizer))
        ch = bundle.manifest.chunking
        texts = [passage_text(p) for p in
                 chunk_documents(read_documents(corpus), tok, max_tokens=ch.max_tokens, overlap=ch.overlap)]
        source = f"{Path(corpus).name}: {len(texts)} passages"
    else:
        from ragrt.retrieval.encoder import TextEncoder
        from ragrt.retrieval.live import LiveRetriever
        from ragrt.runtime.sessions import SessionConfig
        enc = TextEncoder.from_spec(bundle.root, bundle.manifest.encoder, SessionConfig(device="cpu", threads=1))
        store = LiveRetriever(bundle, enc).get().store
        texts = [passage_text(store.get(i)) for i in range(len(store))]
        source = f"the bundle's {len(texts)} passages"
    if len(texts) > n_base:
        keep = np.sort(np.random.default_rng(seed).choice(len(texts), n_base, replace=False))
        texts = [texts[i] for i in keep]
    return texts, source


def base_vectors(bundle, texts: list[str], threads: int) -> np.ndarray:
    """The texts embedded by the bundle's encoder, cached by encoder hash and texts."""
    spec = bundle.manifest.encoder
    path = CACHE / f"base-{digest(spec.source.sha256, spec.quantization, bundle.manifest.files.get(spec.model), texts)}.npy"
    if not path.exists():
        from ragrt.retrieval.encoder import TextEncoder
        from ragrt.runtime.sessions import SessionConfig
        enc = TextEncoder.from_spec(bundle.root, spec, SessionConfig(device="cpu", threads=threads))
        out = np.empty((len(texts), spec.dim), np.float32)
        row = 0
        with _tqdm(total=len(texts), desc="embedding real passages", unit="passage") as bar:
            for batch in enc.embed(texts, batch_size=32):
                out[row:row + len(batch)] = batch
                row += len(batch)
                bar.update(len(batch))
        save_npy(path, out)
    return np.load(path)


def derive(base: np.ndarray, n: int, seed: int, chunk: int = 65536) -> np.ndarray:
    """n vectors by RECIPE, deterministic in (base, n, seed)."""
    rng = np.random.default_rng(seed)
    d = base.shape[1]
    out = np.empty((n, d), np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        parts = rng.integers(2, 4, size=m)                                   # 2 or 3 parents
        idx = rng.integers(0, len(base), size=(m, 3))
        w = rng.dirichlet(np.ones(3), size=m).astype(np.float32)
        w[parts == 2, 2] = 0
        w /= w.sum(1, keepdims=True)
        v = np.einsum("mj,mjd->md", w, base[idx])
        v += rng.standard_normal((m, d), dtype=np.float32) * np.float32(NOISE / np.sqrt(d))
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        out[start:start + m] = v
    return out


def derived_path(base_key: str, n: int, seed: int) -> Path:
    path = CACHE / f"derived-{digest(base_key, n, seed, RECIPE, NOISE)}.npy"
    if not path.exists():
        base = np.load(CACHE / f"{base_key}.npy")
        with atomic_target(path) as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, base.shape[1]))
            chunk = 65536
            with _tqdm(total=n, desc=f"deriving {n:,} vectors", unit="vec") as bar:
                # Each chunk from its own seed, so the result does not depend on the chunking.
                for start in range(0, n, chunk):
                    m = min(chunk, n - start)
                    out[start:start + m] = derive(base, m, seed * 1_000_003 + start // chunk, chunk)
                    bar.update(m)
            out.flush()
            del out
    return path


def exact_topk(vectors: np.ndarray, queries: np.ndarray, k: int, chunk: int = 131072, bar=None) -> np.ndarray:
    """Row ids of the k best dot products per query, best first (the ground truth)."""
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_i = np.zeros((len(queries), k), np.int64)
    for start in range(0, len(vectors), chunk):
        block = np.asarray(vectors[start:start + chunk])
        s = queries @ block.T
        kk = min(k, s.shape[1])
        part = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
        cand_s = np.concatenate([best_s, np.take_along_axis(s, part, 1)], 1)
        cand_i = np.concatenate([best_i, part + start], 1)
        top = np.argpartition(-cand_s, k - 1, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(cand_s, top, 1), np.take_along_axis(cand_i, top, 1)
        if bar is not None:
            bar.update(len(block))
    order = np.argsort(-best_s, axis=1, kind="stable")
    return np.take_along_axis(best_i, order, 1)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(f[:k].tolist()) & set(t.tolist())) / k for f, t in zip(found, truth)]))


# --- the engines, each in its own process ---------------------------------------------------------

def _batch1(search_one, queries: np.ndarray, budget_s: float) -> tuple[list, float, int]:
    """Answers to queries sent one at a time, until all are answered or `budget_s` passes."""
    answers = []
    t0 = time.perf_counter()
    for q in queries:
        answers.append(search_one(q))
        if time.perf_counter() - t0 > budget_s:
            break
    return answers, len(answers) / (time.perf_counter() - t0), len(answers)


def numpy_worker(vec_path: str, q_path: str, gt_path: str, threads: int, budget_s: float) -> dict:
    from threadpoolctl import threadpool_limits
    with threadpool_limits(threads):
        before = memory()
        vectors = np.load(vec_path)                  # in RAM, as an exact-search service would hold them
        queries, truth = np.load(q_path), np.load(gt_path)

        def one(q):
            s = vectors @ q
            top = np.argpartition(-s, K - 1)[:K]
            return top[np.argsort(-s[top])]

        one(queries[0])
        answers, qps1, n1 = _batch1(one, queries, budget_s)
        t = time.perf_counter()
        found = exact_topk(vectors, queries, K, chunk=65536)
        qpsb = len(queries) / (time.perf_counter() - t)
    return {"recall_at_10": recall(found, truth), "recall_at_10_batch1": recall(np.array(answers), truth[:n1]),
            "qps_batch1": qps1, "batch1_queries": n1, "qps_batched": qpsb, "memory_before_load": before,
            "memory": memory(), "data_mib": round(vectors.nbytes / 2**20, 1)}


def _search_runs(search_one, search_all, set_ef, queries, truth, efs, budget_s) -> list[dict]:
    runs = []
    for ef in efs:
        set_ef(ef)
        search_one(queries[0])
        answers, qps1, n1 = _batch1(search_one, queries, budget_s)
        t = time.perf_counter()
        found = search_all(queries)
        qpsb = len(queries) / (time.perf_counter() - t)
        runs.append({"expansion_search": ef, "recall_at_10": recall(found, truth),
                     "recall_at_10_batch1": recall(np.array(answers), truth[:n1]),
                     "qps_batch1": qps1, "batch1_queries": n1, "qps_batched": qpsb})
    return runs


def usearch_build(vec_path: str, index_path: str, spec, expansion_add: int, threads: int) -> dict:
    from ragrt.retrieval.index import build_index
    vectors = np.load(vec_path, mmap_mode="r")
    t = time.perf_counter()
    index = build_index(vectors, spec, expansion_add=expansion_add, threads=threads,
                        log=f"usearch: indexing {len(vectors):,}")
    seconds = time.perf_counter() - t
    with atomic_target(Path(index_path)) as tmp:
        index.save(str(tmp))
    return {"build_s": seconds, "peak_rss_mib": memory().get("peak_rss_mib")}


def usearch_worker(index_path: str, spec, q_path: str, gt_path: str, efs: list[int], default_ef: int, threads: int,
                   budget_s: float) -> dict:
    from ragrt.retrieval.index import open_index, stored
    from ragrt.runtime.madvise import advise_random
    queries, truth = stored(np.load(q_path), spec), np.load(gt_path)      # cast as the engine casts them
    before = memory()
    index = open_index(Path(index_path), spec)
    advise_random(index_path)                        # as engine/retrieval/retriever.py opens it
    loaded = memory()

    def one(q):
        return index.search(q, K).keys

    def all_(qs):
        return index.search(qs, K, threads=threads).keys

    def set_ef(ef):
        index.expansion_search = ef

    # The bundle's setting first, and the memory after it: what the engine's process would hold.
    runs = _search_runs(one, all_, set_ef, queries, truth, [default_ef], budget_s)
    after = memory()
    index_mapped = mapped_mib(index_path)
    runs += _search_runs(one, all_, set_ef, queries, truth, [e for e in efs if e != default_ef], budget_s)
    return {**runs[0], "sweep": sorted(runs, key=lambda r: r["expansion_search"]), "memory_before_load": before,
            "memory_after_load": loaded, "memory": after, "index_mapped_mib": index_mapped,
            "memory_after_sweep": memory()}


def faiss_build(vec_path: str, index_path: str, m: int, ef_construction: int, threads: int) -> dict:
    import faiss
    faiss.omp_set_num_threads(threads)
    vectors = np.load(vec_path, mmap_mode="r")
    t = time.perf_counter()
    index = faiss.IndexHNSWFlat(vectors.shape[1], m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = ef_construction
    chunk = 50000
    with _tqdm(total=len(vectors), desc=f"faiss: indexing {len(vectors):,}", unit="vec") as bar:
        for start in range(0, len(vectors), chunk):
            index.add(np.ascontiguousarray(vectors[start:start + chunk]))
            bar.update(min(chunk, len(vectors) - start))
    seconds = time.perf_counter() - t
    with atomic_target(Path(index_path)) as tmp:
        faiss.write_index(index, str(tmp))
    return {"build_s": seconds, "peak_rss_mib": memory().get("peak_rss_mib")}


def faiss_worker(index_path: str, q_path: str, gt_path: str, efs: list[int], default_ef: int, threads: int,
                 budget_s: float) -> dict:
    import faiss
    faiss.omp_set_num_threads(threads)
    queries, truth = np.load(q_path), np.load(gt_path)
    before = memory()
    index = faiss.read_index(index_path)
    loaded = memory()

    def one(q):
        return index.search(q[None, :], K)[1][0]

    def all_(qs):
        return index.search(qs, K)[1]

    def set_ef(ef):
        index.hnsw.efSearch = ef

    runs = _search_runs(one, all_, set_ef, queries, truth, [default_ef], budget_s)
    after = memory()
    runs += _search_runs(one, all_, set_ef, queries, truth, [e for e in efs if e != default_ef], budget_s)
    return {**runs[0], "sweep": sorted(runs, key=lambda r: r["expansion_search"]), "memory_before_load": before,
            "memory_after_load": loaded, "memory": after, "memory_after_sweep": memory()}


# --- the run --------------------------------------------------------------------------------------

def query(worker, data: Path | list[Path], *args, cap_mib: int | None = None) -> dict:
    """`worker(*args)` in its own process; with `cap_mib`, inside a memory cgroup of that size, with
    `data` (the file or files the worker reads) first dropped from the page cache."""
    if cap_mib is None:
        return in_subprocess(worker, *args)
    for path in data if isinstance(data, list) else [data]:
        drop_page_cache(path)
    with memory_cgroup(cap_mib) as group:
        try:
            r = in_subprocess(in_cgroup, str(group), worker, *args)
        except BrokenProcessPool:
            kills = oom_kills(group)
            return {"status": f"killed: over the {cap_mib} MiB memory cap" if kills else "the worker died"}
    return {**r, "memory_cap_mib": cap_mib}


def run(bundle_path: str, *, corpus: str | None = None, sizes=(100_000,), n_base: int = 4000, n_queries: int = 1000,
        threads: int = 2, engines=("numpy", "usearch", "faiss"), budget_s: float = 10.0, sweep=None,
        seed: int = 0, memory_cap_mib: int | None = None) -> dict:
    limit_threads(threads)          # inherited by the spawned engine processes
    from ragrt.bundle.reader import Bundle
    from ragrt.retrieval.index import EXPANSION_ADD as expansion_add, i8_scale
    bundle = Bundle.open(bundle_path)
    ix = bundle.generation.spec.index
    engines = list(engines)
    if "faiss" in engines:
        try:
            import faiss  # noqa: F401
        except ImportError:
            print("faiss is not installed (pip install faiss-cpu): skipping it", file=sys.stderr)
            engines.remove("faiss")
    texts, source = base_texts(bundle, corpus, n_base, seed)
    base = base_vectors(bundle, texts, threads)
    spec = bundle.manifest.encoder
    base_key = f"base-{digest(spec.source.sha256, spec.quantization, bundle.manifest.files.get(spec.model), texts)}"
    q_path = derived_path(base_key, n_queries, seed + 1)
    out = {"recipe": RECIPE.replace("NOISE", str(NOISE)), "base": {"source": source, "count": len(base),
           "dim": int(base.shape[1])}, "queries": n_queries, "k": K, "threads": threads,
           "bundle_index": {"dtype": ix.dtype, "connectivity": ix.connectivity, "expansion_add": expansion_add,
                            "expansion_search": ix.expansion_search}, "memory_cap_mib": memory_cap_mib, "sizes": []}
    for n in sizes:
        v_path = derived_path(base_key, n, seed + 2)
        gt_path = CACHE / f"truth-{digest(v_path.name, q_path.name, K)}.npy"
        if not gt_path.exists():
            vectors = np.load(v_path, mmap_mode="r")
            with _tqdm(total=n, desc=f"ground truth ({n:,})", unit="vec") as bar:
                save_npy(gt_path, exact_topk(vectors, np.load(q_path), K, bar=bar))
        row = {"n": n, "engines": {}}
        from ragrt.retrieval.retriever import search_breadth
        ef = search_breadth(n, ix.expansion_search)     # what the engine uses for an index this big
        efs = [ef] if memory_cap_mib else sorted(set(sweep or SWEEP) | {ef})
        if "numpy" in engines:
            print(f"[retrieval {n:,}] numpy exact", file=sys.stderr, flush=True)
            r = query(numpy_worker, v_path, str(v_path), str(q_path), str(gt_path), threads, budget_s,
                      cap_mib=memory_cap_mib)
            r["file_mib"] = round(v_path.stat().st_size / 2**20, 1)
            row["engines"]["numpy exact"] = r
        if "usearch" in engines:
            scale = i8_scale(np.load(v_path, mmap_mode="r")) if ix.dtype == "i8" else None   # as export sets it
            key = digest(v_path.name, ix.dtype, ix.connectivity, expansion_add, scale)
            path = CACHE / f"usearch-{key}.usearch"
            meta = path.with_name(path.name + ".json")
            spec = dataclasses.replace(ix, path=path.name, count=n, i8_scale=scale)   # the bundle's settings, n vectors
            if not (path.exists() and meta.exists()):
                save_json(meta, in_subprocess(usearch_build, str(v_path), str(path), spec, expansion_add, threads))
            print(f"[retrieval {n:,}] usearch view", file=sys.stderr, flush=True)
            r = query(usearch_worker, path, str(path), spec, str(q_path), str(gt_path), efs, ef, threads, budget_s,
                      cap_mib=memory_cap_mib)
            r.update(json.loads(meta.read_text()), file_mib=round(path.stat().st_size / 2**20, 1))
            row["engines"]["usearch view"] = r
        if "faiss" in engines:
            key = digest(v_path.name, ix.connectivity, expansion_add)
            path = CACHE / f"faiss-{key}.faiss"
            meta = path.with_name(path.name + ".json")
            if not (path.exists() and meta.exists()):
                save_json(meta, in_subprocess(faiss_build, str(v_path), str(path), ix.connectivity, expansion_add,
                                              threads))
            print(f"[retrieval {n:,}] faiss HNSW", file=sys.stderr, flush=True)
            r = query(faiss_worker, path, str(path), str(q_path), str(gt_path), efs, ef, threads, budget_s,
                      cap_mib=memory_cap_mib)
            r.update(json.loads(meta.read_text()), file_mib=round(path.stat().st_size / 2**20, 1))
            row["engines"]["faiss HNSW"] = r
        for name, r in row["engines"].items():
            if "status" in r:
                print(f"[retrieval {n:,}] {name}: {r['status']}", file=sys.stderr, flush=True)
                continue
            print(f"[retrieval {n:,}] {name}: recall@10 {r['recall_at_10']:.4f}, {r['qps_batch1']:.0f} q/s one at "
                  f"a time, {r['qps_batched']:.0f} q/s batched, RSS {r['memory']['rss_mib']:.0f} MiB "
                  f"(file {r['file_mib']:.0f} MiB)", file=sys.stderr, flush=True)
        out["sizes"].append(row)
    return out


def index_rss_mib(r: dict) -> float:
    """What loading and querying the index added to the process's resident memory."""
    return round(r["memory"]["rss_mib"] - r["memory_before_load"]["rss_mib"], 1)


def markdown(res: dict) -> str:
    lines = [f"Real-derived vectors ({res['base']['count']} real embeddings, {res['base']['source']}; "
             f"{res['recipe']}), {res['queries']} held-out queries, k={res['k']}, {res['threads']} threads. "
             f"usearch and faiss at the bundle's settings: {res['bundle_index']}."
             + (f" Each engine's queries in a memory cgroup capped at {cap} MiB, its data file dropped from the "
                f"page cache first." if (cap := res.get("memory_cap_mib")) else ""), ""]
    lines += ["| vectors | engine | recall@10 | QPS batch 1 | QPS batched | vs numpy (batch 1) | build s | file MiB | "
              "RSS MiB (anon + file) | index RSS / file | index file resident MiB | peak RSS MiB | MiB read from storage |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in res["sizes"]:
        ref = row["engines"].get("numpy exact", {}).get("qps_batch1")
        for name, r in row["engines"].items():
            if "status" in r:
                lines.append(f"| {row['n']:,} | {name} | {r['status']} |" + " |" * 10)
                continue
            m = r["memory"]
            ratio = _times(r['qps_batch1'] / ref) if ref else "–"
            share = f"{index_rss_mib(r) / r['file_mib']:.2f}" if r.get("file_mib") else "–"
            build = f"{r['build_s']:.0f}" if "build_s" in r else "–"
            lines.append(f"| {row['n']:,} | {name} | {r['recall_at_10']:.4f} | {r['qps_batch1']:.0f} | "
                         f"{r['qps_batched']:.0f} | {ratio} | {build} | {r['file_mib']:.0f} | {m['rss_mib']:.0f} "
                         f"({m.get('rss_anon_mib', 0):.0f} + {m.get('rss_file_mib', 0):.0f}) | {share} | "
                         f"{r.get('index_mapped_mib', '–')} | {m.get('peak_rss_mib', 0):.0f} | "
                         f"{m.get('disk_read_mib', '–')} |")
    lines += ["", "expansion_search sweep (recall@10 / QPS batch 1):", "",
              "| vectors | engine | " + " | ".join(f"ef={e}" for e in _efs(res)) + " |",
              "|---|---|" + "---|" * len(_efs(res))]
    for row in res["sizes"]:
        for name, r in row["engines"].items():
            if "sweep" in r:
                by = {s["expansion_search"]: s for s in r["sweep"]}
                cells = [f"{by[e]['recall_at_10']:.4f} / {by[e]['qps_batch1']:.0f}" if e in by else "–"
                         for e in _efs(res)]
                lines.append(f"| {row['n']:,} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _times(x: float) -> str:
    return f"{x:.0f}×" if x >= 10 else f"{x:.2f}×"


def _efs(res: dict) -> list[int]:
    return sorted({s["expansion_search"] for row in res["sizes"] for r in row["engines"].values()
                   for s in r.get("sweep", [])})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True)
    p.add_argument("--corpus", default=None, help="JSONL corpus for the real passages (default: the bundle's)")
    p.add_argument("--sizes", default="100000,1000000", help="comma-separated vector counts")
    p.add_argument("--base", type=int, default=4000, help="real passages to embed")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--engines", default="numpy,usearch,faiss")
    p.add_argument("--budget", type=float, default=10.0, help="seconds per batch-1 timing (numpy stops early)")
    p.add_argument("--memory-cap", type=int, default=None, metavar="MIB",
                   help="run each engine's queries in a memory cgroup of MIB MiB (needs root or a delegated "
                        "cgroup), its data file dropped from the page cache first; skips the sweep")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    try:
        res = run(args.bundle, corpus=args.corpus, sizes=[int(s) for s in args.sizes.split(",")], n_base=args.base,
                  n_queries=args.queries, threads=args.threads, engines=args.engines.split(","),
                  budget_s=args.budget, memory_cap_mib=args.memory_cap)
    except CgroupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return report(res, markdown, args.json)


if __name__ == "__main__":
    sys.exit(main())
