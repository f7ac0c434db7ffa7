"""How many tokens of each reused passage block to recompute: answer F1 and teacher-forced agreement per level.

    python benchmarks/passage_kv_repair.py --bundle bundles/faq-base --qa data/faq/dev.jsonl \
        --repairs 0,4,8,16,32 --out benchmarks/results/passage_kv_repair-dev.json

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

from ragrt import Engine
from ragrt.decoding.blocks import BlockCache
from ragrt.decoding.prompt import PromptBuilder
from ragrt.evaluate import evaluate, read_qa
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--qa", type=Path, required=True)
    ap.add_argument("--repairs", default="0,16", help="comma-separated token counts (default 0,16)")
    ap.add_argument("--parity-prompts", type=int, default=20, help="built-in prompts for the agreement (as export)")
    ap.add_argument("--timing-questions", type=int, default=5, help="questions timed per level (default 5)")
    ap.add_argument("--per-block", action="store_true",
                    help="also measure each level running the repair block by block, without the assembly graph")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    engine = Engine.open(args.bundle)
    items = read_qa(args.qa)
    builder = PromptBuilder(engine.manifest.prompt, engine.tokenizer,
                            budget=engine.manifest.generator.max_context - PARITY_NEW_TOKENS)
    t0 = time.perf_counter()
    full = evaluate(engine, items, mode="concat", passage_kv="off").answer["f1"]
    rows = {"full": {"f1": round(full, 4), "seconds": round(time.perf_counter() - t0, 1)}}
    print(f"full prefill: F1 {full:.3f}", flush=True)
    graph = engine.decoder.assemble_session
    ways = [("", graph)] + ([("-per-block", None)] if args.per_block and graph is not None else [])
    for r in (int(x) for x in args.repairs.split(",")):
        for suffix, session in ways:
            engine.decoder.assemble_session = session
            engine.passage_kv.repair = r
            engine.passage_kv.cache = BlockCache(engine.passage_kv.cache.budget)   # blocks do not depend on r; timings do
            t0 = time.perf_counter()
            f1 = evaluate(engine, items, mode="concat", passage_kv="on").answer["f1"]
            seconds = round(time.perf_counter() - t0, 1)
            agreement = block_agreement(engine.decoder, builder, args.parity_prompts, PARITY_NEW_TOKENS, repair=r)[0]
            rows[f"r{r}{suffix}"] = {"repair": r, "assembly_graph": session is not None, "f1": round(f1, 4),
                                     "gap": round(f1 - full, 4), "agreement": round(agreement, 4), "seconds": seconds,
                                     "timings_ms": timings(engine, QUESTIONS[:args.timing_questions])}
            print(f"repair {r}{suffix}: F1 {f1:.3f} ({100 * (f1 - full):+.1f} points), agreement {agreement:.3f}",
                  flush=True)
    report = {"bundle": str(args.bundle), "qa": str(args.qa), "questions": len(items), "machine": machine(),
              "rows": rows}
    args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
