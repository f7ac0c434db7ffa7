"""10M passages on one node: a sharded corpus generation, searched in a memory cgroup, then grown
by `ragrt index add`.

    python benchmarks/scale.py --bundle BS --corpus data/python-docs.jsonl --passages 10000000 \
        --memory-cap 1024 --json scale.json

BS is a small real bundle with one index (`make demo` builds one): its encoder, generator and
settings are kept, and a copy of it gets a corpus generation of `--passages` rows in `--shards`
index shards of `--dtype` vectors, as `ragrt export --shards S --index-dtype D` lays them out.
The vectors are real-derived, as in retrieval.py (same recipe, cache and ground truth): row i is
derived vector i. Each row's passage record reuses a real passage's title and text under its
own id, so the passage store has a real store's size.

Steps, each timed:
1. build: shard j's index over its rows, built in its own process with the bundle's
   connectivity and the export's expansion_add (cached under ~/.cache/ragrt/bench).
2. a copy of BS is given the new generation: the shards, a passage store, published as
   `ragrt index add` publishes (corpus/gen-N, one rename).
3. search: the engine's own `Retriever.open` in a fresh process (memory-mapped shards, the
   engine's search breadth), 1000 held-out query vectors one at a time, then batched; recall@10
   against numpy exact search. First a breadth sweep without a cap (page cache warm), then at
   the engine's breadth inside a memory cgroup of `--memory-cap` MiB, every file of the
   generation dropped from the page cache first; there only the queries answered one at a time
   within `--budget` seconds are scored, as each reads much of what it visits from storage.
4. add: `ragrt index add` of `--add` new passages (real texts, one passage per document), as a
   user runs it; wall time, bytes the process wrote, and which files of the new generation are
   new and which are hard links into the previous one.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (CACHE, CgroupError, atomic_target, digest, in_subprocess, limit_threads, memory,  # noqa: E402
                    report, save_json, save_npy)
from retrieval import K, _tqdm, base_texts, base_vectors, derived_path, exact_topk, query, recall  # noqa: E402

SWEEP = (128, 256, 512, 1024)


def build_shard(vec_path: str, start: int, stop: int, index_path: str, spec, threads: int) -> dict:
    from ragrt.retrieval.index import build_index
    vectors = np.load(vec_path, mmap_mode="r")[start:stop]
    t = time.perf_counter()
    index = build_index(vectors, spec, threads=threads, log=f"usearch: rows {start:,}..{stop:,}")
    seconds = time.perf_counter() - t
    with atomic_target(Path(index_path)) as tmp:
        index.save(str(tmp))
    return {"build_s": seconds, "peak_rss_mib": memory().get("peak_rss_mib")}


def synthetic_passages(texts: list[tuple[str, str]], n: int):
    """n passage records, one document each, cycling real (title, text) pairs under unique ids."""
    from ragrt.retrieval.passages import Passage, passage_id
    for i in range(n):
        title, text = texts[i % len(texts)]
        yield Passage(passage_id(f"synthetic/{i}", 0), title, text)


def write_generation(bundle_path: Path, shard_files: list[Path], specs: list, texts, n: int) -> float:
    """Publishes a generation of these shards and n synthetic passages into the bundle; returns seconds."""
    from ragrt.bundle.manifest import PassagesSpec
    from ragrt.bundle.reader import Bundle
    from ragrt.bundle.versions import DATA_FILE, OFFSETS_FILE, publish, staging
    from ragrt.retrieval.passages import write_passage_store
    bundle = Bundle.open(bundle_path)
    gen = bundle.generation
    t = time.perf_counter()
    with staging(bundle.root) as tmp:
        for f, spec in zip(shard_files, specs):
            (tmp / spec.path).parent.mkdir(parents=True, exist_ok=True)
            os.link(f, tmp / spec.path)          # the cached build, never written again
        with _tqdm(total=n, desc="passage store", unit="passage") as bar:
            def counted():
                for i, p in enumerate(synthetic_passages(texts, n)):
                    if i % 100_000 == 0:
                        bar.update(min(100_000, n - i))
                    yield p
            count = write_passage_store(tmp / DATA_FILE, tmp / OFFSETS_FILE, counted())
        publish(bundle.root, tmp, number=gen.spec.number + 1, manifest_sha256=bundle.manifest_sha256,
                index=specs[0], shards=tuple(specs[1:]), passages=PassagesSpec(DATA_FILE, OFFSETS_FILE, count),
                documents=n)
    return time.perf_counter() - t


def search_worker(bundle_path: str, q_path: str, gt_path: str, efs: list[int], threads: int, budget_s: float,
                  batched: bool = True) -> dict:
    """The engine's retriever over the bundle's current generation; recall and QPS per breadth.
    Without `batched`, only the queries answered one at a time within the budget are scored."""
    from ragrt.bundle.reader import Bundle
    from ragrt.retrieval.retriever import Retriever
    queries, truth = np.load(q_path), np.load(gt_path)
    before = memory()
    t = time.perf_counter()
    gen = Bundle.open(bundle_path).generation        # checks every corpus file's sha256, as the engine does
    checked = time.perf_counter() - t
    retriever = Retriever.open(gen.path, gen.spec.index, gen.spec.passages, None, shards=gen.spec.shards)
    opened = time.perf_counter() - t
    engine_efs = sorted({index.expansion_search for index in retriever.index.shards})
    loaded = memory()
    runs = []
    for ef in efs or engine_efs:
        for index in (retriever.index.shards if efs else ()):
            index.expansion_search = ef
        retriever.search(queries[:1], K)
        t0, answers = time.perf_counter(), []
        for q in queries:
            answers.append([h.row for h in retriever.search(q[None, :], K)[0]])
            if time.perf_counter() - t0 > budget_s:
                break
        qps1 = len(answers) / (time.perf_counter() - t0)
        run = {"expansion_search": ef if efs else engine_efs[-1],
               "recall_at_10_batch1": recall(np.array(answers), truth[:len(answers)]),
               "qps_batch1": qps1, "batch1_queries": len(answers)}
        if batched:
            t = time.perf_counter()
            found = np.array([[h.row for h in hits] for hits in retriever.search(queries, K)])
            run.update(recall_at_10=recall(found, truth), qps_batched=len(queries) / (time.perf_counter() - t))
        runs.append(run)
    return {"runs": runs, "open_s": opened, "integrity_check_s": checked, "memory_before_load": before,
            "memory_after_load": loaded, "memory": memory()}


def generation_files(bundle_path: Path) -> list[Path]:
    from ragrt.bundle.reader import Bundle
    gen = Bundle.open(bundle_path).generation
    return [gen.file(rel) for rel in gen.spec.files]


def index_add(bundle_path: Path, texts, n_add: int, threads: int) -> dict:
    """`ragrt index add` of n_add one-passage documents, as a user runs it."""
    from ragrt.bundle.reader import Bundle
    docs = CACHE / f"scale-add-{n_add}.jsonl"
    with atomic_target(docs) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for i in range(n_add):
            title, text = texts[(i * 7919) % len(texts)]
            f.write(json.dumps({"id": f"added/{i}", "title": title, "text": text}) + "\n")
    before = Bundle.open(bundle_path).generation
    old_bytes = sum(before.file(rel).stat().st_size for rel in before.spec.files)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    cmd = [str(Path(sys.executable).with_name("ragrt")), "index", "add", "--bundle", str(bundle_path),
           "--corpus", str(docs), "--threads", str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-500:]}")
    written = (resource.getrusage(resource.RUSAGE_CHILDREN).ru_oublock - usage.ru_oublock) * 512
    after = Bundle.open(bundle_path).generation
    files = {}
    for rel, entry in after.spec.files.items():
        st = after.file(rel).stat()
        files[rel] = {"mib": round(entry.bytes / 2**20, 1), "linked": st.st_nlink > 1}
    new_mib = sum(f["mib"] for f in files.values() if not f["linked"])
    return {"added": n_add, "seconds": seconds, "written_mib": round(written / 2**20, 1),
            "new_files_mib": round(new_mib, 1), "generation_mib": round(old_bytes / 2**20, 1),
            "passages_after": after.spec.passages.count, "files": files, "stdout": done.stdout.strip()}


def run(bundle_path: str, *, corpus: str | None, n: int, work: Path, shards: int = 16, dtype: str = "i8",
        n_base: int = 4000, n_queries: int = 1000, threads: int = 2, budget_s: float = 10.0,
        memory_cap_mib: int | None = None, n_add: int = 1000, sweep=SWEEP, seed: int = 0) -> dict:
    limit_threads(threads)
    from ragrt.bundle.reader import Bundle
    from ragrt.retrieval.index import EXPANSION_ADD, i8_scale
    from ragrt.retrieval.shards import first_rows, shard_path, shard_sizes
    src = Bundle.open(bundle_path)
    ix = src.generation.spec.index
    if len(src.generation.spec.index_shards) > 1:
        raise SystemExit(f"{bundle_path}: give a bundle with one index; --shards sets the layout measured")
    texts, source = base_texts(src, corpus, n_base, seed)
    base = base_vectors(src, texts, threads)
    spec = src.manifest.encoder
    base_key = f"base-{digest(spec.source.sha256, spec.quantization, src.manifest.files.get(spec.model), texts)}"
    q_path = derived_path(base_key, n_queries, seed + 1)
    v_path = derived_path(base_key, n, seed + 2)
    gt_path = CACHE / f"truth-{digest(v_path.name, q_path.name, K)}.npy"
    if not gt_path.exists():
        with _tqdm(total=n, desc=f"ground truth ({n:,})", unit="vec") as bar:
            save_npy(gt_path, exact_topk(np.load(v_path, mmap_mode="r"), np.load(q_path), K, bar=bar))

    sizes = shard_sizes(n, shards)
    scale = i8_scale(np.load(v_path, mmap_mode="r")) if dtype == "i8" else None     # as export sets it
    specs, files, builds = [], [], []
    for j, (first, size) in enumerate(zip(first_rows(sizes), sizes)):
        s = dataclasses.replace(ix, path=shard_path(ix.path, j, shards), dtype=dtype, count=size, i8_scale=scale)
        f = CACHE / f"shard-{digest(v_path.name, first, size, dtype, ix.connectivity, EXPANSION_ADD, scale)}.usearch"
        meta = f.with_name(f.name + ".json")
        if not (f.exists() and meta.exists()):
            print(f"[scale] building shard {j + 1}/{shards} ({size:,} vectors, {dtype})", file=sys.stderr, flush=True)
            save_json(meta, in_subprocess(build_shard, str(v_path), first, first + size, str(f), s, threads))
        specs.append(s)
        files.append(f)
        builds.append({**json.loads(meta.read_text()), "file_mib": round(f.stat().st_size / 2**20, 1)})

    target = work / f"scale-{n}"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(bundle_path, target, copy_function=os.link)    # bundle files are never written in place
    real = [(title, text or title) for title, _, text in (t.partition("\n") for t in texts)]   # passage_text's layout
    publish_s = write_generation(target, files, specs, real, n)

    out = {"passages": n, "shards": shards, "budget_s": budget_s, "dtype": dtype, "i8_scale": scale,
           "connectivity": ix.connectivity,
           "expansion_add": EXPANSION_ADD, "threads": threads, "queries": n_queries, "k": K,
           "base": {"source": source, "count": len(base)}, "memory_cap_mib": memory_cap_mib,
           "build": {"seconds": round(sum(b["build_s"] for b in builds), 1),
                     "index_mib": round(sum(b["file_mib"] for b in builds), 1),
                     "peak_rss_mib": max(b["peak_rss_mib"] or 0 for b in builds), "shards": builds},
           "publish_s": round(publish_s, 1),
           "store_mib": round(sum(f.stat().st_size for f in generation_files(target) if "passages" in f.name)
                              / 2**20, 1)}
    args = (str(target), str(q_path), str(gt_path))
    if sweep:
        print("[scale] breadth sweep, no cap", file=sys.stderr, flush=True)
        out["sweep"] = in_subprocess(search_worker, *args, list(sweep), threads, budget_s)["runs"]
        print(json.dumps(out["sweep"]), file=sys.stderr, flush=True)
    print("[scale] the engine's breadth" + (f", {memory_cap_mib} MiB cap" if memory_cap_mib else ""),
          file=sys.stderr, flush=True)
    # Under a cap every query reads most of what it visits from storage: score those answered
    # one at a time within the budget, not all of them.
    out["search"] = query(search_worker, generation_files(target), *args, [], threads, budget_s,
                          not memory_cap_mib, cap_mib=memory_cap_mib)
    if n_add:
        print(f"[scale] ragrt index add of {n_add} passages", file=sys.stderr, flush=True)
        out["add"] = index_add(target, real, n_add, threads)
    return out


def markdown(res: dict) -> str:
    b, s = res["build"], res["search"]
    lines = [f"{res['passages']:,} real-derived vectors ({res['base']['count']} real embeddings, {res['base']['source']}) "
             f"in {res['shards']} shards, {res['dtype']}, connectivity {res['connectivity']}, expansion_add "
             f"{res['expansion_add']}, {res['threads']} threads; {res['queries']} held-out queries, k={res['k']}.", "",
             f"- build: {b['seconds']:.0f} s for all shards, index files {b['index_mib']:,.0f} MiB, peak RSS "
             f"{b['peak_rss_mib']:,.0f} MiB; passage store {res['store_mib']:,.0f} MiB, written and published in "
             f"{res['publish_s']:.0f} s"]
    if "status" in s:
        lines.append(f"- search in a {res['memory_cap_mib']} MiB cgroup: {s['status']}")
    else:
        r, m = s["runs"][0], s["memory"]
        where = f"in a {res['memory_cap_mib']} MiB memory cgroup" if res["memory_cap_mib"] else "uncapped"
        batched = (f"; all {res['queries']}: recall@10 {r['recall_at_10']:.4f}, {r['qps_batched']:.1f} queries/s "
                   "batched" if "qps_batched" in r else "")
        lines.append(f"- search {where}, the engine's breadth {r['expansion_search']}: recall@10 "
                     f"{r['recall_at_10_batch1']:.4f} over the {r['batch1_queries']} queries answered one at a time "
                     f"in {res['budget_s']:.0f} s, {r['qps_batch1']:.2f} queries/s{batched}; RSS {m['rss_mib']:.0f} MiB "
                     f"({m.get('rss_anon_mib', 0):.0f} anon + {m.get('rss_file_mib', 0):.0f} file), "
                     f"read from storage {m.get('disk_read_mib', '–')} MiB; opening took {s['open_s']:.1f} s, "
                     f"{s['integrity_check_s']:.1f} s of it checking the corpus files' sha256")
    if "sweep" in res:
        lines += ["", "Breadth sweep, no memory cap (recall@10 / queries/s one at a time / batched):", "",
                  "| expansion_search | recall@10 | QPS batch 1 | QPS batched |", "|---|---|---|---|"]
        lines += [f"| {r['expansion_search']} | {r['recall_at_10']:.4f} | {r['qps_batch1']:.1f} | "
                  f"{r['qps_batched']:.1f} |" for r in res["sweep"]]
    if "add" in res:
        a = res["add"]
        linked = sum(f["mib"] for f in a["files"].values() if f["linked"])
        lines += ["", f"`ragrt index add` of {a['added']:,} passages: {a['seconds']:.1f} s, {a['written_mib']:,.1f} "
                  f"MiB written; new files {a['new_files_mib']:,.1f} MiB, hard-linked {linked:,.1f} MiB of a "
                  f"{a['generation_mib']:,.0f} MiB generation.", "",
                  "| file of the new generation | MiB | hard link into the previous |", "|---|---|---|"]
        lines += [f"| {rel} | {f['mib']:,.1f} | {'yes' if f['linked'] else 'no'} |"
                  for rel, f in sorted(a["files"].items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True, help="a small bundle with one index, its models used as they are")
    p.add_argument("--corpus", default=None, help="JSONL corpus for the real passages (default: the bundle's)")
    p.add_argument("--passages", type=int, default=10_000_000)
    p.add_argument("--shards", type=int, default=16, help="index shards of the grown generation")
    p.add_argument("--dtype", default="i8", choices=("f16", "i8", "f32"), help="how the shards store vectors")
    p.add_argument("--work", default=str(CACHE), help="where the grown copy of the bundle is written")
    p.add_argument("--base", type=int, default=4000, help="real passages to embed")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--add", type=int, default=1000, help="passages `ragrt index add` adds at the end (0: none)")
    p.add_argument("--sweep", default=",".join(map(str, SWEEP)),
                   help="expansion_search values of the uncapped sweep (empty: none)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--budget", type=float, default=10.0, help="seconds per one-at-a-time timing")
    p.add_argument("--memory-cap", type=int, default=None, metavar="MIB",
                   help="search in a memory cgroup of MIB MiB (needs root or a delegated cgroup)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    try:
        res = run(args.bundle, corpus=args.corpus, n=args.passages, work=Path(args.work), shards=args.shards,
                  dtype=args.dtype, n_base=args.base,
                  n_queries=args.queries, threads=args.threads, budget_s=args.budget,
                  memory_cap_mib=args.memory_cap, n_add=args.add,
                  sweep=[int(e) for e in args.sweep.split(",") if e])
    except CgroupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return report(res, markdown, args.json)


if __name__ == "__main__":
    sys.exit(main())
