"""How many tokens of each reused passage block to recompute: answer F1 and teacher-forced agreement per level.

    python benchmarks/passage_kv_repair.py --bundle bundles/faq-base --qa data/faq/dev.jsonl \
        --repairs 0,4,8,16,32 --out benchmarks/results/passage_kv_repair-dev.json

Several --qa files are answered as one pool and reported file by file too: a generator never trained on
a split can be measured on all of them, where one split of 36 questions moves 2-3 points a question.

For each repair level r, the QA file is answered in block mode (mode concat, the bundle's decoding) with
the first r tokens of every block after the first recomputed over the assembled cache, beside full
prefill; and the export's own check (`block_agreement`, the built-in parity prompts) is run at r.
The F1 gap says which r holds, and the timings (blocks cached, one token) what it costs. The
agreement beside it is what the export can measure without `--dev`, so the pairs calibrate
`PASSAGE_KV_AGREEMENT` (export/pipeline.py). With --per-block too, a bundle with an assembly graph
(`generator.assemble_model`) is measured at each r a second time with the repair run block by block
as older bundles run it (rows `r16-per-block`): the same computation, in more runs.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
from ragrt import Engine
from ragrt.decoding.blocks import BlockCache
from ragrt.decoding.prompt import PromptBuilder
from ragrt.evaluate import evaluate, read_qa, token_f1
from ragrt.export.parity import block_agreement
from ragrt.export.pipeline import PARITY_NEW_TOKENS

from common import QUESTIONS, machine


def timings(engine: Engine, questions: list[str]) -> dict[str, float]:
    """Median `timings_ms` of one-token answers in block mode, each question asked twice and the
    second (blocks cached) kept: what the repair adds before the first token."""
    for q in questions:
        engine.ask(q, mode="concat", passage_kv="on", max_new_tokens=1)
    warm = [engine.ask(q, mode="concat", passage_kv="on", max_new_tokens=1).timings_ms for q in questions]
    return {k: round(statistics.median(t.get(k, 0.0) for t in warm), 1) for k in sorted({k for t in warm for k in t})}


def per_question(report, items) -> list[float]:
    """Each answer's token F1, in the QA file's order: paired gaps pool across splits."""
    return [round(token_f1(p, qa.answer), 4) for p, qa in zip(report.predictions, items)]


def gaps(full: list[float], blocks: list[float], files: list[tuple[str, int]]) -> dict:
    """The paired F1 gap (block mode minus full prefill) per file and pooled, with the pooled gap's 90%
    bootstrap interval over questions (seeded)."""
    gap = np.asarray(blocks) - np.asarray(full)
    per_file, start = {}, 0
    for name, n in files:
        per_file[name] = round(float(gap[start:start + n].mean()), 4)
        start += n
    draws = np.random.default_rng(0).choice(gap, (4000, len(gap))).mean(axis=1)
    return {"by_file": per_file, "pooled": round(float(gap.mean()), 4),
            "pooled_90": [round(float(x), 4) for x in np.percentile(draws, [5, 95])]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--qa", type=Path, nargs="+", required=True, help="QA JSONL files, pooled")
    ap.add_argument("--repairs", default="0,16", help="comma-separated token counts (default 0,16)")
    ap.add_argument("--parity-prompts", type=int, default=20, help="built-in prompts for the agreement (as export)")
    ap.add_argument("--timing-questions", type=int, default=5, help="questions timed per level (default 5)")
    ap.add_argument("--per-block", action="store_true",
                    help="also measure each level running the repair block by block, without the assembly graph")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    engine = Engine.open(args.bundle)
    by_file = [(str(path), read_qa(path)) for path in args.qa]
    items = [qa for _, file_items in by_file for qa in file_items]
    files = [(name, len(file_items)) for name, file_items in by_file]
    builder = PromptBuilder(engine.manifest.prompt, engine.tokenizer,
                            budget=engine.manifest.generator.max_context - PARITY_NEW_TOKENS)
    t0 = time.perf_counter()
    report = evaluate(engine, items, mode="concat", passage_kv="off")
    full = report.answer["f1"]
    rows = {"full": {"f1": round(full, 4), "seconds": round(time.perf_counter() - t0, 1),
                     "per_question_f1": per_question(report, items)}}
    print(f"full prefill: F1 {full:.3f}", flush=True)
    graph = engine.decoder.assemble_session
    ways = [("", graph)] + ([("-per-block", None)] if args.per_block and graph is not None else [])
    for r in (int(x) for x in args.repairs.split(",")):
        for suffix, session in ways:
            engine.decoder.assemble_session = session
            engine.passage_kv.repair = r
            engine.passage_kv.cache = BlockCache(engine.passage_kv.cache.budget)   # blocks do not depend on r; timings do
            t0 = time.perf_counter()
            report = evaluate(engine, items, mode="concat", passage_kv="on")
            f1 = report.answer["f1"]
            seconds = round(time.perf_counter() - t0, 1)
            agreement = block_agreement(engine.decoder, builder, args.parity_prompts, PARITY_NEW_TOKENS, repair=r)[0]
            per_q = per_question(report, items)
            rows[f"r{r}{suffix}"] = {"repair": r, "assembly_graph": session is not None, "f1": round(f1, 4),
                                     "gap": round(f1 - full, 4),
                                     "gaps": gaps(rows["full"]["per_question_f1"], per_q, files),
                                     "agreement": round(agreement, 4), "seconds": seconds,
                                     "per_question_f1": per_q,
                                     "timings_ms": timings(engine, QUESTIONS[:args.timing_questions])}
            lo, hi = rows[f"r{r}{suffix}"]["gaps"]["pooled_90"]
            print(f"repair {r}{suffix}: F1 {f1:.3f} ({100 * (f1 - full):+.1f} points, 90% {100 * lo:+.1f} to "
                  f"{100 * hi:+.1f}), agreement {agreement:.3f}", flush=True)
    out = {"bundle": str(args.bundle), "qa": dict(files), "questions": len(items), "machine": machine(),
           "rows": rows}
    args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
