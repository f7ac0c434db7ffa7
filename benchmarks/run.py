"""The benchmark suite in one command: JSON, a markdown summary with ratios and the acceptance checks, PNG plots.

    python benchmarks/run.py --bundle B8 [--bundle B4] --corpus data/python-docs.jsonl \\
        --sizes 100000,1000000 --out benchmarks/results/suite
    python benchmarks/run.py --bundle B8 --out /tmp/suite --quick        # minutes, not an hour

Writes OUT.json (everything), OUT.md (tables, ratios, acceptance checks) and OUT-*.png.
Runs, in order, each independent (one failing is recorded and the others still run):
- limits: measured memory bandwidth and the decode/prefill limits (benchmarks/limits.py);
- generation: benchmarks/generation.py on every bundle, as a subprocess;
- encoding: the first bundle's encoder vs sentence-transformers (benchmarks/encoding.py);
- retrieval: usearch view vs numpy exact vs faiss HNSW at --sizes (benchmarks/retrieval.py);
- ask: end-to-end latency and answers/s at 1, 4, 16 clients (benchmarks/ask.py).
Every engine runs with the same --threads. The acceptance checks are computed from the numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine, save_json  # noqa: E402

HERE = Path(__file__).resolve().parent
STEPS = ("limits", "generation", "encoding", "retrieval", "ask")

ENCODER_RATIO = 3.0           # int8 encoder at batch 1 vs sentence-transformers
RECALL = 0.97                 # usearch recall@10 at 1M vectors
TARGET_SIZE = 1_000_000
RSS_SHARE = 0.5               # "well below the file size": the index's RSS at most half the file
RSS_CHECK = f"memory-mapped usearch index: process RSS well below the file size (<= {RSS_SHARE:g}x)"
RSS_PRIVATE_CHECK = f"memory-mapped usearch index: private (anonymous) RSS well below the file size (<= {RSS_SHARE:g}x)"


def run_generation(bundles: list[str], out: Path, runs: int, threads: int) -> dict:
    """benchmarks/generation.py on every bundle, as a subprocess (it runs each engine in its own)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    paths = {"json": out.with_name(out.name + "-generation.json"), "markdown": out.with_name(out.name + "-generation.md"),
             "plot": out.with_name(out.name + "-generation.png")}
    cmd = [sys.executable, str(HERE / "generation.py"), *[a for b in bundles for a in ("--bundle", b)],
           "--json", str(paths["json"]), "--markdown", str(paths["markdown"]), "--plot", str(paths["plot"]),
           "--runs", str(runs), "--threads", str(threads)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0 or not paths["json"].exists():
        raise RuntimeError(f"generation.py exited {p.returncode}: {p.stderr[-2000:]}")
    res = {"command": cmd, "results": json.loads(paths["json"].read_text()),
           "markdown": paths["markdown"].read_text(), "plot": paths["plot"].name}
    return res


def checks(res: dict) -> list[dict]:
    """The issue's acceptance criteria, each pass/fail from the measured numbers (None: not measured)."""
    out = []
    enc = res.get("encoding")
    if isinstance(enc, dict) and "ratios" in enc:
        r = enc["ratios"]
        worst = min(r["batch1_passages_per_s"], r["batch1_questions_per_s"])
        quant = enc["encoder"]["quantization"]
        out.append({"check": f"encoder int8 at batch 1 >= {ENCODER_RATIO:g}x sentence-transformers",
                    "value": round(worst, 2), "passed": quant == "int8" and worst >= ENCODER_RATIO,
                    "detail": f"{quant} encoder; passages {r['batch1_passages_per_s']:.2f}x, "
                              f"questions {r['batch1_questions_per_s']:.2f}x (the lower counts)"})
    else:
        out.append({"check": f"encoder int8 at batch 1 >= {ENCODER_RATIO:g}x sentence-transformers",
                    "value": None, "passed": None, "detail": "not measured"})
    ret = res.get("retrieval")
    largest = None
    if isinstance(ret, dict) and ret.get("sizes"):
        largest = max(ret["sizes"], key=lambda s: s["n"])
    us = largest["engines"].get("usearch view") if largest else None
    if us:
        n = largest["n"]
        at = "" if n >= TARGET_SIZE else f" (measured at {n:,} only, not {TARGET_SIZE:,})"
        enough = [s["expansion_search"] for s in us["sweep"] if s["recall_at_10"] >= RECALL]
        out.append({"check": f"usearch recall@10 >= {RECALL} at {TARGET_SIZE:,} vectors",
                    "value": round(us["recall_at_10"], 4), "passed": us["recall_at_10"] >= RECALL and n >= TARGET_SIZE,
                    "detail": f"bundle's expansion_search={us['expansion_search']}{at}; smallest swept value "
                              f"reaching {RECALL}: {min(enough) if enough else 'none'}"})
        from retrieval import index_rss_mib
        rss = index_rss_mib(us)
        anon = us["memory"]["rss_anon_mib"] - us["memory_before_load"]["rss_anon_mib"]
        file = us["file_mib"]
        after_load = us["memory_after_load"]["rss_mib"] - us["memory_before_load"]["rss_mib"]
        out.append({"check": RSS_CHECK, "value": round(rss / file, 3) if file else None,
                    "passed": bool(file) and rss <= RSS_SHARE * file and n >= TARGET_SIZE,
                    "detail": f"index RSS {rss:.0f} MiB after load and {ret['queries']} queries ({after_load:.0f} MiB "
                              f"after load alone; process {us['memory']['rss_mib']:.0f} MiB) vs file {file:.0f} MiB "
                              f"at {n:,}{at}; file-backed pages the queries touched count here"})
        out.append({"check": RSS_PRIVATE_CHECK, "value": round(anon / file, 3) if file else None,
                    "passed": bool(file) and anon <= RSS_SHARE * file and n >= TARGET_SIZE,
                    "detail": f"anonymous (private) RSS the index added: {anon:.0f} MiB vs file {file:.0f} MiB; "
                              f"the mapped file pages are page cache the kernel can drop{at}"})
    else:
        for name in (f"usearch recall@10 >= {RECALL} at {TARGET_SIZE:,} vectors", RSS_CHECK, RSS_PRIVATE_CHECK):
            out.append({"check": name, "value": None, "passed": None, "detail": "not measured"})
    gen = res.get("generation")
    if isinstance(gen, dict) and isinstance(gen.get("results"), dict):
        # generation.py computes issue 4's decode, TTFT and batch targets from the same run.
        out += [{"check": c["check"], "value": c["figures"], "passed": c["passed"], "detail": "generation.py"}
                for c in gen["results"].get("acceptance", [])]
    return out


def markdown(res: dict) -> str:
    lines = ["# ragrt benchmark suite", "", f"Run {res['started']}, {res['seconds']:.0f} s; bundles: "
             f"{', '.join(res['bundles'])}; {res['threads']} threads for every engine.", "",
             f"Machine: {res['machine'].get('cpu')} (family {res['machine'].get('family')} model "
             f"{res['machine'].get('model')}), {res['machine'].get('cpus')} CPUs, "
             f"{res['machine'].get('memory_gib')} GiB, SIMD {', '.join(res['machine'].get('simd', []))}; "
             f"load average at the start {res['machine'].get('load_average')}.", "", "## Acceptance checks", "",
             "| check | value | result | detail |", "|---|---|---|---|"]
    for c in res["checks"]:
        verdict = {True: "**pass**", False: "**FAIL**", None: "not measured"}[c["passed"]]
        lines.append(f"| {c['check']} | {c['value']} | {verdict} | {c['detail']} |")
    import ask
    import encoding
    import limits
    import retrieval
    sections = [("Limits", "limits", limits.markdown), ("Encoding", "encoding", encoding.markdown),
                ("Retrieval", "retrieval", retrieval.markdown), ("End-to-end ask", "ask", ask.markdown)]
    for title, key, fmt in [sections[0], ("Generation", "generation", _generation_md), *sections[1:]]:
        lines += ["", f"## {title}", ""]
        r = res.get(key)
        if r is None:
            lines.append("Not run.")
        elif "error" in r:
            lines.append(f"Failed: `{r['error'].splitlines()[-1] if r['error'] else ''}` (see the JSON).")
        else:
            lines.append(fmt(r))
        if key in res.get("plots", {}):
            lines += ["", f"![{title}]({res['plots'][key]})"]
    return "\n".join(lines) + "\n"


def _generation_md(r: dict) -> str:
    return r["markdown"]


def plots(res: dict, out: Path) -> dict:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    made = {}
    enc = res.get("encoding")
    if isinstance(enc, dict) and "engines" in enc:
        keys = [("batch1_questions_per_s", "batch 1, questions"), ("batch1_passages_per_s", "batch 1, passages"),
                ("batch32_passages_per_s", "batch 32, passages")]
        fig, ax = plt.subplots(figsize=(7, 4))
        width = 0.8 / len(enc["engines"])
        for i, (name, r) in enumerate(enc["engines"].items()):
            ax.bar([j + i * width for j in range(len(keys))], [r[k] for k, _ in keys], width, label=name)
        ax.set_xticks([j + width * (len(enc["engines"]) - 1) / 2 for j in range(len(keys))], [t for _, t in keys])
        ax.set_ylabel("texts/s")
        ax.set_title(f"Encoding, {enc['threads']} threads")
        ax.legend()
        made["encoding"] = _save(fig, out, "encoding")
    ret = res.get("retrieval")
    if isinstance(ret, dict) and ret.get("sizes"):
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for row in ret["sizes"]:
            for name, r in row["engines"].items():
                pts = r.get("sweep") or [r]
                axes[0].plot([p["recall_at_10"] for p in pts], [p["qps_batch1"] for p in pts], "o-",
                             label=f"{name}, {row['n']:,}")
        axes[0].set_xlabel("recall@10")
        axes[0].set_ylabel("queries/s, one at a time")
        axes[0].set_yscale("log")
        axes[0].axvline(RECALL, color="grey", ls=":")
        axes[0].set_title("Recall vs speed (HNSW: expansion_search / efSearch sweep)")
        axes[0].legend(fontsize=7)
        largest = max(ret["sizes"], key=lambda s: s["n"])
        names = list(largest["engines"])
        x = range(len(names))
        axes[1].bar([i - 0.2 for i in x], [largest["engines"][n]["memory"]["rss_mib"] for n in names], 0.4,
                    label="process RSS after queries")
        axes[1].bar([i + 0.2 for i in x], [largest["engines"][n]["file_mib"] for n in names], 0.4,
                    label="file size (vectors / index)")
        axes[1].set_xticks(list(x), names)
        axes[1].set_ylabel("MiB")
        axes[1].set_title(f"Memory at {largest['n']:,} vectors")
        axes[1].legend()
        made["retrieval"] = _save(fig, out, "retrieval")
    a = res.get("ask")
    if isinstance(a, dict) and a.get("levels"):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        c = [lv["clients"] for lv in a["levels"]]
        for p in ("p50", "p95", "p99"):
            axes[0].plot(c, [lv[f"{p}_ms"] / 1e3 for lv in a["levels"]], "o-", label=p)
        axes[0].set_xlabel("concurrent clients")
        axes[0].set_ylabel("latency, s")
        axes[0].set_xscale("log", base=2)
        axes[0].legend()
        axes[1].plot(c, [lv["qps"] for lv in a["levels"]], "o-")
        axes[1].set_xlabel("concurrent clients")
        axes[1].set_ylabel("answers/s")
        axes[1].set_xscale("log", base=2)
        fig.suptitle(f"End-to-end ask, answers of up to {a['max_new_tokens']} tokens")
        made["ask"] = _save(fig, out, "ask")
    return made


def _save(fig, out: Path, name: str) -> str:
    path = out.with_name(f"{out.name}-{name}.png")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path.name


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", action="append", default=[], help="repeat for several bundles (generation)")
    p.add_argument("--out", default="benchmarks/results/suite", help="path prefix of the outputs")
    p.add_argument("--corpus", default=None, help="JSONL corpus for retrieval's real passages (default: the bundle's)")
    p.add_argument("--sizes", default=None, help="retrieval vector counts (default 100000,1000000; quick: 20000)")
    p.add_argument("--queries", type=int, default=None, help="retrieval queries (default 1000; quick: 200)")
    p.add_argument("--base", type=int, default=None, help="real passages to embed (default 4000; quick: 1000)")
    p.add_argument("--texts", type=int, default=None, help="encoding texts (default 256; quick: 64)")
    p.add_argument("--encode-seconds", type=float, default=None,
                   help="least seconds per encoding measurement (default 3; quick: 1)")
    p.add_argument("--clients", default="1,4,16")
    p.add_argument("--duration", type=float, default=None, help="ask seconds per level (default 30; quick: 5)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--runs", type=int, default=None, help="generation runs (default 5; quick: 1)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--st-model", default=None, help="sentence-transformers model (default: packaged MiniLM)")
    p.add_argument("--skip", default="", help=f"comma-separated steps to skip: {', '.join(STEPS)}")
    p.add_argument("--quick", action="store_true", help="small sizes and short runs")
    p.add_argument("--render", action="store_true",
                   help="measure nothing: recompute the checks, markdown and plots from OUT.json")
    args = p.parse_args(argv)
    q = args.quick
    sizes = [int(s) for s in (args.sizes or ("20000" if q else "100000,1000000")).split(",")]
    skip = {s for s in args.skip.split(",") if s}
    unknown = skip - set(STEPS)
    if unknown:
        p.error(f"unknown step(s) to skip: {', '.join(sorted(unknown))}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.render:
        return write(json.loads(out.with_name(out.name + ".json").read_text()), out)
    if not args.bundle:
        p.error("--bundle is required (unless --render)")
    bundle = args.bundle[0]

    import ask
    import encoding
    import limits
    import retrieval
    steps = {
        "limits": lambda: limits.run(threads=args.threads, gib=0.25 if q else 1.0),
        "generation": lambda: run_generation(args.bundle, out, args.runs or (1 if q else 5), args.threads),
        "encoding": lambda: encoding.run(bundle, n_texts=args.texts or (64 if q else 256), threads=args.threads,
                                         min_s=args.encode_seconds or (1.0 if q else 3.0), st_model=args.st_model),
        "retrieval": lambda: retrieval.run(bundle, corpus=args.corpus, sizes=sizes,
                                           n_base=args.base or (1000 if q else 4000),
                                           n_queries=args.queries or (200 if q else 1000), threads=args.threads,
                                           budget_s=2.0 if q else 10.0),
        "ask": lambda: ask.run(bundle, clients=[int(c) for c in args.clients.split(",")],
                               duration_s=args.duration or (5.0 if q else 30.0), max_new_tokens=args.max_new_tokens,
                               threads=args.threads),
    }
    started = time.time()
    res = {"started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)), "bundles": args.bundle,
           "threads": args.threads, "quick": q, "machine": machine()}
    for name in STEPS:
        if name in skip:
            continue
        print(f"== {name}", file=sys.stderr, flush=True)
        t = time.perf_counter()
        try:
            res[name] = steps[name]()
        except Exception:              # one benchmark failing must not lose the others
            res[name] = {"error": traceback.format_exc()}
            print(res[name]["error"], file=sys.stderr, flush=True)
        print(f"== {name}: {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    res["seconds"] = time.time() - started
    return write(res, out)


def write(res: dict, out: Path) -> int:
    res["checks"] = checks(res)
    try:
        res["plots"] = plots(res, out)
    except Exception:
        res["plots"] = {}
        res["plots_error"] = traceback.format_exc()
    save_json(out.with_name(out.name + ".json"), res)
    md = markdown(res)
    tmp = out.with_name(out.name + ".md.tmp")
    tmp.write_text(md)
    tmp.replace(out.with_name(out.name + ".md"))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
