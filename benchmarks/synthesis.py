"""Synthetic questions: the generator's time per passage with the prompts' shared prefix run once, against whole prompts.

    python benchmarks/synthesis.py --corpus data/faq/corpus.jsonl [--passages 8] [--rounds 2] [--json synthesis.json]

Both ways write the same questions (tests/test_synth.py checks it); only `SharedPrefix.split`
differs: the common opening of the batch's prompts (system prompt, worked examples, the ask)
lent to every row as its past, or nothing shared. The passages are the first words of seeded
documents of the corpus; the two ways alternate, each round in the other order.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report  # noqa: E402


def run(corpus: str, *, passages: int, rounds: int) -> dict:
    from ragrt.export.data import synth
    from ragrt.export.models import generator_checkpoint
    from ragrt.retrieval.passages import Passage
    docs = [json.loads(line) for line in open(corpus, encoding="utf-8")]
    random.Random(1).shuffle(docs)
    sample = [Passage(d["id"] + "#0", d.get("title", ""), " ".join(d["text"].split()[:90])) for d in docs[:passages]]
    out = Path(tempfile.mkdtemp()) / "q.jsonl"
    cfg = synth.SynthConfig(corpus=Path(corpus), out=out, encoder=out.parent, generator=generator_checkpoint("smollm2-135m"))
    shared = synth.SharedPrefix.split
    ways = {"shared": staticmethod(shared), "whole": staticmethod(lambda prompts: ((), prompts))}
    seconds: dict[str, list[float]] = {w: [] for w in ways}
    questions: dict[str, list[str]] = {}
    try:
        for rnd in range(rounds):
            for way in (("whole", "shared") if rnd % 2 == 0 else ("shared", "whole")):
                synth.SharedPrefix.split = ways[way]
                synth.replies_path(out).unlink(missing_ok=True)     # ask every passage again
                t0 = time.perf_counter()
                questions[way] = [q.question for q in synth.generator_questions(cfg, sample)[0]]
                seconds[way].append(time.perf_counter() - t0)
    finally:
        synth.SharedPrefix.split = staticmethod(shared)
    return {"passages": passages, "rounds": rounds, "seconds": seconds, "same_questions": questions["shared"] == questions["whole"],
            "ratio_whole_over_shared": sum(seconds["whole"]) / sum(seconds["shared"])}


def markdown(res: dict) -> str:
    s = res["seconds"]
    return (f"{res['passages']} passages x {res['rounds']} rounds: whole prompts "
            f"{', '.join(f'{x:.1f}' for x in s['whole'])} s, shared prefix {', '.join(f'{x:.1f}' for x in s['shared'])} s; "
            f"**{res['ratio_whole_over_shared']:.2f}x**; the same questions: {res['same_questions']}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", required=True, help="JSONL documents ({id, title, text})")
    p.add_argument("--passages", type=int, default=8, help="passages to question (default 8: one batch)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    return report(run(args.corpus, passages=args.passages, rounds=args.rounds), markdown, args.json)


if __name__ == "__main__":
    sys.exit(main())
