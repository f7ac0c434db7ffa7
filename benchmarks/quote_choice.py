"""Can the generator choose the quote? Verbatim runs of the retrieved passages, scored by the
generator, against `extract` (issue 28, benchmarks/README "Session 21").

    python benchmarks/quote_choice.py --bundle bundles/faq-ft21 --qa data/faq/dev.jsonl \
        --out benchmarks/results/quote_choice-ft21-dev.json

A run starts at any sentence of a top-k passage and ends at a later sentence end within `--words`
words. Each is scored by log P(run, then end of answer | the bundle's prompt), teacher-forced: one
prefill of the prompt, then one pass per start sentence over its longest run, which gives every
shorter run's score too. Runs are whitespace-normalized before scoring, as the FAQ references are.
Rules that pick a run are then compared by mean token F1 with `extract`'s answer and with the best
run (the ceiling of any chooser). `--encoder-weights` also tries `extract` with the bundle's encoder
at sentence level: w x cos(question, sentence) added to each sentence's score.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics

import numpy as np

from ragrt import Engine
from ragrt import extract as X
from ragrt.bundle.atomic import atomic_write_text
from ragrt.evaluate import read_qa, token_f1


def runs_of(engine: Engine, p, scored: list[X.Sentence], words: int) -> list[dict]:
    """Every candidate run of `p`'s passages with the generator's scores and `extract`'s score of its
    first sentence (`scored`: `extract`'s sentences of those passages)."""
    decoder, tokenizer = engine.decoder, engine.tokenizer
    eos = int(engine.manifest.generator.eos_token_ids[0])
    first = {}
    for s in scored:
        first.setdefault(s.rank, []).append(s.score)
    logits, state = decoder.prefill([list(p.builder.build(p.question, p.passages).ids)])
    first_lp = logits[0] - np.logaddexp.reduce(logits[0])
    runs = []
    for rank, passage in enumerate(p.passages):
        text = passage.text
        sentences = X.split_sentences(text)
        for i, (a, _) in enumerate(sentences):
            ends, n = [], 0
            for j in range(i, len(sentences)):
                n += len(text[sentences[j][0]:sentences[j][1]].split())
                if n > words and j > i:
                    break
                ends.append(j)
            longest = " ".join(text[a:sentences[ends[-1]][1]].split())
            enc = tokenizer.encode(longest, add_special_tokens=False)
            ids = enc.ids
            out, after = decoder.forward(state, np.asarray([ids]), np.ones((1, len(ids)), dtype=np.int64),
                                         num_logits=len(ids))
            state = decoder.forget(after, len(ids))
            lp = out[0] - np.logaddexp.reduce(out[0], axis=-1, keepdims=True)
            token_lp = np.concatenate([[first_lp[ids[0]]], lp[np.arange(len(ids) - 1), ids[1:]]])
            total = np.cumsum(token_lp)
            for j in ends:
                end = len(" ".join(text[a:sentences[j][1]].split()))
                t = max(t for t, (_, stop) in enumerate(enc.offsets) if stop <= end)
                runs.append({"rank": rank, "first": i, "last": j, "text": text[a:sentences[j][1]],
                             "tokens": t + 1, "log_p": float(total[t] + lp[t][eos]), "first_score": first[rank][i]})
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--qa", required=True, help="a JSONL QA split")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--words", type=int, default=60, help="longest run, in words")
    ap.add_argument("--encoder-weights", type=float, nargs="*", default=[1, 2, 4, 8, 16])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="write the figures and every run's scores here as JSON")
    args = ap.parse_args()
    engine = Engine.open(args.bundle, device="cpu", threads=args.threads)
    settings = engine.manifest.rag.extract
    questions = []
    for n, qa in enumerate(read_qa(args.qa), 1):
        p = engine.prepare(qa.question, k=args.k, mode="concat")
        scored = X.score_sentences(p.question, p.passages, p.prior, settings)
        runs = runs_of(engine, p, scored, args.words)
        for r in runs:
            r["f1"] = token_f1(r["text"], qa.answer)
        sentences = [p.passages[s.rank].text[s.start:s.end] for s in scored]
        cos = engine.encoder.embed_all([qa.question] + sentences)
        cos = cos / np.linalg.norm(cos, axis=1, keepdims=True)
        questions.append({"question": qa.question, "answer": qa.answer, "runs": runs, "prepared": p,
                          "sentence_cos": (cos[1:] @ cos[0]).tolist()})
        print(f"{n} questions, {len(runs)} runs", flush=True)

    def chosen(rule) -> float:
        return statistics.mean(max(q["runs"], key=rule)["f1"] for q in questions)

    def extract_f1(weight: float) -> float:
        plain = X.score_sentences
        f1 = []
        for q in questions:
            p, cos = q["prepared"], q["sentence_cos"]
            X.score_sentences = lambda *a: [dataclasses.replace(s, score=s.score + weight * c) for s, c in zip(plain(*a), cos)]
            try:
                f1.append(token_f1(X.extract(p.question, p.passages, p.prior, settings), q["answer"]))
            finally:
                X.score_sentences = plain
        return statistics.mean(f1)

    def from_extracts_first(q) -> float:
        top = max(q["runs"], key=lambda r: r["first_score"])
        return max((r for r in q["runs"] if (r["rank"], r["first"]) == (top["rank"], top["first"])),
                   key=lambda r: r["log_p"])["f1"]

    figures = {
        "extract": extract_f1(0.0),
        "oracle": chosen(lambda r: r["f1"]),
        "log_p": chosen(lambda r: r["log_p"]),
        "log_p_per_token": chosen(lambda r: r["log_p"] / (r["tokens"] + 1)),
        **{f"log_p_per_token+{w:g}*first_score": chosen(lambda r, w=w: r["log_p"] / (r["tokens"] + 1) + w * r["first_score"])
           for w in (0.5, 1, 2)},
        "log_p, from extract's first sentence": statistics.mean(from_extracts_first(q) for q in questions),
        **{f"extract+{w:g}*sentence_cos": extract_f1(w) for w in args.encoder_weights},
    }
    for name, value in figures.items():
        print(f"{name:40s} {value:.3f}")
    if args.out:
        for q in questions:      # a run's text is its passage's sentences [first, last]: kept out, for size
            del q["prepared"]
            for r in q["runs"]:
                del r["text"]
                r.update({key: round(r[key], 4) for key in ("log_p", "first_score", "f1")})
            q["sentence_cos"] = [round(c, 4) for c in q["sentence_cos"]]
        atomic_write_text(args.out, json.dumps({"bundle": args.bundle, "qa": args.qa, "k": args.k, "words": args.words,
                                                "f1": figures, "questions": questions}))


if __name__ == "__main__":
    main()
