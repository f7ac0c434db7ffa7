"""Transfer-learning report: base vs fine-tuned, fp32 vs int8, and the three RAG modes,
measured with `ragrt eval` on the Python FAQ test split. Writes a markdown table, a PNG
chart and the raw JSON. Bundles and evaluations already present are reused.

    python benchmarks/transfer.py --data data/faq --run runs/faq --work bench/transfer [--out benchmarks/results]

`--data` comes from `ragrt data python-faq`, `--run` from `ragrt finetune`.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

METRICS = [("retrieval", "recall@1"), ("retrieval", "recall@5"), ("retrieval", "recall@10"), ("retrieval", "mrr@10"),
           ("answer", "exact_match"), ("answer", "f1"), ("answer", "rouge_l")]


def ragrt(*args: str) -> None:
    print("$ ragrt " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "ragrt", *args], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--run", required=True, type=Path)
    ap.add_argument("--work", required=True, type=Path, help="bundles and evaluation JSON go here")
    ap.add_argument("--out", default=Path("benchmarks/results"), type=Path)
    ap.add_argument("--split", default="test")
    ap.add_argument("--max-new-tokens", default="64")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    corpus = str(args.data / "corpus.jsonl")
    bundles = {     # the two fine-tuned bundles share their passage embeddings (the export's cache)
        "finetuned-int8": ["--encoder", str(args.run / "encoder"), "--generator", str(args.run / "generator")],
        "finetuned-fp32": ["--encoder", str(args.run / "encoder"), "--generator", str(args.run / "generator"),
                           "--quantize", "fp32"],
        "base-int8": [],
    }
    for name, extra in bundles.items():
        if not (args.work / name / "manifest.json").exists():
            ragrt("export", "--corpus", corpus, "--out", str(args.work / name), "--force", *extra)
    runs = [("base-int8", "concat"), ("finetuned-int8", "concat"), ("finetuned-fp32", "concat"),
            ("finetuned-int8", "token"), ("finetuned-int8", "sequence")]
    results = {}
    for bundle, mode in runs:
        out = args.work / f"eval-{bundle}-{mode}.json"
        if not out.exists():
            ragrt("eval", "--bundle", str(args.work / bundle), "--qa", str(args.data / f"{args.split}.jsonl"),
                  "--mode", mode, "--max-new-tokens", args.max_new_tokens, "--json", str(out))
        results[f"{bundle} {mode}"] = json.loads(out.read_text())

    header = "| bundle, mode | " + " | ".join(m for _, m in METRICS) + " | p50 ms | p95 ms |"
    lines = [header, "|" + "---|" * (len(METRICS) + 3)]
    for name, r in results.items():
        cells = [f"{r[g][m]:.3f}" for g, m in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['latency_ms']['p50']:.0f} | {r['latency_ms']['p95']:.0f} |")
    n = next(iter(results.values()))["n"]
    table = f"Python FAQ {args.split} split, {n} questions, `ragrt eval`, max {args.max_new_tokens} new tokens.\n\n" \
            + "\n".join(lines) + "\n"
    (args.out / "transfer.md").write_text(table)
    (args.out / "transfer.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    print(table)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(results)
    for i, (name, r) in enumerate(results.items()):
        ax.bar([j + i * width for j in range(len(METRICS))], [r[g][m] for g, m in METRICS], width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(METRICS))], [m for _, m in METRICS])
    ax.set_ylim(0, 1)
    ax.set_title(f"ragrt transfer learning: Python FAQ {args.split} split ({n} questions)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "transfer.png", dpi=110)


if __name__ == "__main__":
    main()
