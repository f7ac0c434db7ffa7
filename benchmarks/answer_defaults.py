"""Which prompt template and decoding defaults give readable answers: F1 and loop rate per setting.

    python benchmarks/answer_defaults.py --bundle base=bundles/faq-base --qa data/faq/dev.jsonl \
        --templates all --decodings greedy --out benchmarks/results/answer_defaults-templates.json

Every template x decoding pair is scored by `ragrt eval`'s own loop (F1, EM, ROUGE-L, loop rate)
on the QA file, and on the README's showcase questions (loop rate only: they have no reference).
The template is swapped in the opened engine, so one bundle serves every row.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from ragrt import Engine
from ragrt.decoding.prompt import PromptBuilder
from ragrt.evaluate import QA, evaluate, read_qa

# The questions a new user meets first: README, `make demo`, and the ones the issue saw loop.
SHOWCASE = [
    "How do I remove duplicates from a list while keeping the order?",
    "How do I copy a list?",
    "What is a generator?",
    "What is a generator in Python?",
    "What does the json module do?",
    "How do I read a file line by line?",
    "What is the difference between a list and a tuple?",
    "How do I sort a dictionary by value?",
]

# Field overrides of the bundle's PromptSpec. "numbered" is the template bundles had before.
TEMPLATES = {
    "numbered": {"passage": "[{n}] {title}\n{text}"},
    "plain": {"passage": "{title}\n{text}"},
    "plain-notitle": {"passage": "{text}"},
    "plain-rule": {"passage": "{title}\n{text}", "passage_separator": "\n\n---\n\n"},
    "plain-cue": {"passage": "{title}\n{text}",
                  "user": "Context:\n{context}\n\nQuestion: {question}\n\nAnswer in a few sentences."},
    "plain-instruction-last": {"passage": "{title}\n{text}", "system": "You are a helpful assistant.",
                               "user": "Context:\n{context}\n\nUsing only the context above, answer briefly and "
                                       "precisely.\nQuestion: {question}"},
}

DECODINGS = {
    "greedy": {},
    "rp1.1": {"repetition_penalty": 1.1},
    "rp1.2": {"repetition_penalty": 1.2},
    "rp1.3": {"repetition_penalty": 1.3},
    "nrng3": {"no_repeat_ngram_size": 3},
    "nrng4": {"no_repeat_ngram_size": 4},
    "rp1.1+nrng4": {"repetition_penalty": 1.1, "no_repeat_ngram_size": 4},
    "rp1.2+nrng4": {"repetition_penalty": 1.2, "no_repeat_ngram_size": 4},
    "t0.3": {"temperature": 0.3, "top_p": 0.9, "seed": 0},
    "t0.3+rp1.1": {"temperature": 0.3, "top_p": 0.9, "seed": 0, "repetition_penalty": 1.1},
}


def use_template(engine: Engine, overrides: dict[str, str]) -> None:
    """Swaps the engine's prompt spec and re-caches the fixed prefix the new spec starts with."""
    spec = dataclasses.replace(engine.manifest.prompt, **overrides)
    engine.manifest = dataclasses.replace(engine.manifest, prompt=spec)
    engine.decoder.cache_prefix(PromptBuilder(spec, engine.tokenizer,
                                              budget=engine.manifest.generator.max_context).fixed_prefix())


def pick(names: str, table: dict) -> list[str]:
    chosen = list(table) if names == "all" else names.split(",")
    unknown = [n for n in chosen if n not in table]
    if unknown:
        sys.exit(f"unknown {unknown}; choose from {', '.join(table)} or all")
    return chosen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", action="append", required=True, metavar="LABEL=PATH",
                    help="a bundle to score, labelled in the table (repeatable)")
    ap.add_argument("--qa", type=Path, required=True, help="QA JSONL with reference answers (the FAQ dev split)")
    ap.add_argument("--templates", default="all", help=f"comma-separated from: {', '.join(TEMPLATES)}; or all")
    ap.add_argument("--decodings", default="all", help=f"comma-separated from: {', '.join(DECODINGS)}; or all")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: the bundle's")
    ap.add_argument("--no-showcase", action="store_true", help="skip the showcase questions")
    ap.add_argument("--out", type=Path, required=True, help="JSON with every row and every answer")
    args = ap.parse_args()

    items = read_qa(args.qa)
    showcase = [QA(question=q, answer="", positive_ids=()) for q in SHOWCASE]
    rows = []
    for spec in args.bundle:
        label, path = spec.split("=", 1)
        engine = Engine.open(path)
        for t in pick(args.templates, TEMPLATES):
            use_template(engine, TEMPLATES[t])
            for d in pick(args.decodings, DECODINGS):
                options = dict(DECODINGS[d])
                if args.max_new_tokens:
                    options["max_new_tokens"] = args.max_new_tokens
                t0 = time.perf_counter()
                qa = evaluate(engine, items, **options)
                shown = None if args.no_showcase else evaluate(engine, showcase, **options)
                row = {"bundle": label, "template": t, "decoding": d, **qa.answer,
                       "showcase_loops": None if shown is None else shown.answer["loops"],
                       "seconds": round(time.perf_counter() - t0, 1),
                       "answers": qa.predictions, "showcase": None if shown is None else shown.predictions}
                rows.append(row)
                print(f"{label:8s} {t:24s} {d:12s} f1 {row['f1']:.3f}  rouge_l {row['rouge_l']:.3f}  "
                      f"loops {row['loops']}/{qa.n}  showcase loops "
                      f"{'-' if shown is None else str(row['showcase_loops']) + '/' + str(shown.n)}  {row['seconds']} s",
                      flush=True)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                tmp = args.out.with_suffix(".tmp")
                tmp.write_text(json.dumps(rows, indent=1))
                tmp.replace(args.out)


if __name__ == "__main__":
    main()
