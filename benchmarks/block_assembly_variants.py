"""Other ways to assemble passage KV for a generator never block-trained (issue 29 item 1,
benchmarks/README "Session 23"): which tokens to recompute, a temperature on the reused keys, and
blocks computed behind a lead-in of other passages. None is in the engine; each variant is measured
against full prefill.

    python benchmarks/block_assembly_variants.py --bundle bundles/faq-base --qa data/faq/train.jsonl \
        --questions 80 --variants first16,graded8,first16+lead:corpus2
    python benchmarks/block_assembly_variants.py --bundle bundles/faq-base --f1 \
        --qa data/faq/train.jsonl data/faq/dev.jsonl data/faq/test.jsonl --variants first16,graded8

Without --f1: teacher-forced top-1 agreement of block mode with full prefill's greedy answer (48
tokens) and its mean NLL, on the first --questions questions (fast; a screen). With --f1: answer F1
of the bundle's decoding in block mode against full prefill over all the questions, the paired gap
pooled and per file (benchmarks/passage_kv_repair.py's figures).

A variant is a repair schedule, optionally `+keys:S` (every reused block's keys times S after their
rotation: S < 1 flattens attention over the passages, an APE-like temperature, arXiv 2502.05431) and
`+lead:L` (every block after the first computed behind the prompt's prefix and the lead-in L, so it
reads as a passage that follows others; the first block behind the prefix alone, as full prefill
has it). Schedules name, for a block at rank j >= 1, the tokens run again over the assembled cache:
none, firstN (its first N, the engine's repair), lastN, firstNlastN, gradedN (its first N x j),
revgradedN (its first N x (blocks - j)). Lead-ins: corpusN, the top N passages the bundle retrieves
for LEAD_IN_QUERY (corpusN@QUESTION: for QUESTION); generic, two built-in paragraphs of documentation prose.

The assembly below is `PassageKV._assemble` with the variant's choices (the repair run with the
assembly graph, as the engine runs it), kept here so that the engine keeps its one path.
"""
from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np
from ragrt import Engine
from ragrt.decoding.blocks import PassageKV, rotate_keys, widen
from ragrt.decoding.generator import Generator, greedy
from ragrt.decoding.kvquant import KV_INT8, dequantize, quantize
from ragrt.evaluate import evaluate, read_qa
from ragrt.retrieval.passages import Passage

from passage_kv_repair import gaps, per_question

LEAD_IN_QUERY = "What is the Python Software Foundation license?"
GENERIC = (("Conventions", "The examples in this documentation are written for the current release. Names in monospace "
            "refer to code: functions, classes, modules and their arguments. Optional arguments are shown in square "
            "brackets, and an argument with a default value may be left out. Where a behaviour depends on the "
            "platform or the version, the text says so, and notes mark what changed and when."),
           ("Overview", "This section describes the parts of the system, what each one is for and how they fit "
            "together. Each part is introduced with a short example, followed by a reference of its options. The "
            "reference lists every option with its type, its default and its effect, and links to related sections. "
            "Readers new to the system may start with the tutorial and come back here for details."))


def schedule(name: str):
    """(block start, block ids, rank, blocks) -> the runs [(start, ids)] to recompute."""
    m = re.fullmatch(r"(none|first|last|graded|revgraded)(\d*)(?:last(\d+))?", name)
    if not m:
        raise SystemExit(f"unknown schedule {name!r}")
    kind, n, m2 = m.group(1), int(m.group(2) or 0), int(m.group(3) or 0)
    return {"none": lambda at, ids, j, nb: [],
            "first": lambda at, ids, j, nb: [(at, ids[:n])] + ([(at + len(ids) - m2, ids[-m2:])] if m2 else []),
            "last": lambda at, ids, j, nb: [(at + len(ids) - n, ids[-n:])],
            "graded": lambda at, ids, j, nb: [(at, ids[:n * j])],
            "revgraded": lambda at, ids, j, nb: [(at, ids[:n * (nb - j)])]}[kind]


def variant_assembly(runs, key_scale: float, lead_in: tuple[int, ...]):
    def _assemble(self, buffers, row, prompt, stats):
        arrays, p = buffers.arrays, len(prompt.prefix)
        for a, kv in zip(arrays, self._prefix(prompt.prefix)[0]):
            a[row, :, :p] = kv
        scales = self.decoder.kv_scales if arrays[0].dtype == KV_INT8 else None
        offset, repairs = p, []
        for j, ids in enumerate(prompt.blocks):
            context = prompt.prefix + lead_in if j and lead_in else prompt.prefix
            kv = self.block(context, ids, stats)       # keyed by its context, as the cache must
            kv = widen(kv, arrays[0].dtype) if scales is None else kv
            n = len(ids)
            for i, a in enumerate(arrays):
                if i % 2:
                    a[row, :, offset:offset + n] = kv[i]
                    continue
                keys = kv[i] if scales is None else dequantize(kv[i], scales[i])
                turned = rotate_keys(keys, offset - len(context), self.decoder.spec, i // 2) * key_scale
                a[row, :, offset:offset + n] = turned if scales is None else quantize(turned, scales[i])
            if j:
                repairs += [(start, list(r)) for start, r in runs(offset, list(ids), j, len(prompt.blocks)) if len(r)]
            offset += n
        if repairs:
            return self._repair_with_tail(buffers, row, repairs, offset, prompt.tail)
        tail = np.asarray([prompt.tail], dtype=np.int64)
        return self.decoder._run(buffers, row, row + 1, tail, np.array([offset + len(prompt.tail)]), 1)[:, -1]
    return _assemble


def lead_in_ids(engine: Engine, name: str) -> tuple[int, ...]:
    name, _, query = name.partition("@")
    p = engine.prepare(query or LEAD_IN_QUERY, k=5, mode="concat")
    if name == "generic":
        passages = [Passage(f"lead-in#{i}", title, text) for i, (title, text) in enumerate(GENERIC)]
    elif name.startswith("corpus"):
        passages = p.passages[:int(name[len("corpus"):])]
    else:
        raise SystemExit(f"unknown lead-in {name!r}")
    return tuple(t for ids in p.builder.build_blocks("", passages)[0].blocks for t in ids)


def use(engine: Engine, variant: str) -> None:
    parts = variant.split("+")
    key_scale, lead_in = 1.0, ()
    for part in parts[1:]:
        what, _, value = part.partition(":")
        if what == "keys":
            key_scale = float(value)
        elif what == "lead":
            lead_in = lead_in_ids(engine, value)
        else:
            raise SystemExit(f"unknown variant part {part!r}")
    PassageKV._assemble = variant_assembly(schedule(parts[0]), key_scale, lead_in)
    # Room for any schedule's recomputed tokens after the cache (the assembly graph's run).
    PassageKV._repaired = lambda self, prompt: sum(len(b) for b in prompt.blocks)


def agreement(engine: Engine, prompts) -> tuple[float, float]:
    agree = total = 0
    nll = 0.0
    for prompt, reference in prompts:
        gen = Generator(engine.decoder, passage_kv=engine.passage_kv)
        gen.add_prompts([prompt])
        for token in reference:
            logits = gen.logits[0]
            agree += int(logits.argmax() == token)
            nll -= logits[token] - np.logaddexp.reduce(logits)
            total += 1
            gen.append(np.array([token], dtype=np.int64))
    return agree / total, nll / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--qa", nargs="+", required=True)
    ap.add_argument("--variants", required=True, help="comma-separated, e.g. first16,graded8,first16+lead:corpus2")
    ap.add_argument("--questions", type=int, default=80, help="agreement: the first this-many questions")
    ap.add_argument("--f1", action="store_true", help="answer F1 against full prefill instead of agreement")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    engine = Engine.open(args.bundle)
    by_file = [(str(path), read_qa(path)) for path in args.qa]
    items = [qa for _, file_items in by_file for qa in file_items]
    rows = {}
    if args.f1:
        full = evaluate(engine, items, mode="concat", passage_kv="off")
        rows["full"] = {"f1": round(full.answer["f1"], 4), "per_question_f1": per_question(full, items)}
        print(f"full prefill: F1 {full.answer['f1']:.4f}", flush=True)
    else:
        eos = engine.decoder.spec.eos_token_ids
        prompts = []
        for qa in items[:args.questions]:
            p = engine.prepare(qa.question, k=5, mode="concat")
            prompt, _ = p.builder.build_blocks(p.question, p.passages)
            reference = []
            for token in greedy(engine.decoder, prompt.ids, 48):
                if token in eos:
                    break
                reference.append(token)
            prompts.append((prompt, reference))
    for variant in args.variants.split(","):
        use(engine, variant)
        t0 = time.perf_counter()
        if args.f1:
            report = evaluate(engine, items, mode="concat", passage_kv="on")
            per_q = per_question(report, items)
            rows[variant] = {"f1": round(report.answer["f1"], 4), "per_question_f1": per_q,
                             "gaps": gaps(rows["full"]["per_question_f1"], per_q, [(n, len(f)) for n, f in by_file])}
            print(f"{variant}: F1 {report.answer['f1']:.4f}, gap {rows[variant]['gaps']}", flush=True)
        else:
            share, nll = agreement(engine, prompts)
            rows[variant] = {"agreement": round(share, 4), "nll": round(nll, 4)}
            print(f"{variant}: agreement {share:.4f}, NLL {nll:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"bundle": args.bundle, "qa": [n for n, _ in by_file], "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
