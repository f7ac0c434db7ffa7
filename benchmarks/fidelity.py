"""How closely quantized generators follow a reference graph on a QA set, teacher-forced.

    python benchmarks/fidelity.py --bundle B --qa dev.jsonl --qa test.jsonl \\
        --reference fp32=PATH.onnx --graph int8=PATH.onnx --graph int4=B/generator/model.onnx

Each question gets the bundle's concat prompt (its own retrieval, its k passages), followed by
the reference answer's first --answer-tokens tokens. Every graph scores every answer position
at once. Per graph: the mean negative log-likelihood of the reference answers (lower: the
answer is likelier), and against the reference graph the mean KL divergence of the next-token
distributions and the share of positions with the same top token. Unlike F1 over generated
answers, where one early different word changes the rest, every position counts on its own.
All graphs must share the bundle's tokenizer and cache layout.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path


def _named(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, Path(path)


def sequences(engine, qa_files: list[Path], answer_tokens: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, reference answer ids) per question."""
    from ragrt.errors import UserInputError
    from ragrt.corpus.jsonl import iter_jsonl
    out = []
    for path in qa_files:
        for where, row in iter_jsonl(path):
            if not isinstance(row.get("question"), str) or not isinstance(row.get("answer"), str):
                raise UserInputError(f"{where}: needs string fields \"question\" and \"answer\"")
            prepared = engine.prepare(row["question"], max_new_tokens=answer_tokens)
            prompt = prepared.builder.build(row["question"], prepared.passages).ids
            out.append((prompt, engine.tokenizer.encode(row["answer"], add_special_tokens=False).ids[:answer_tokens]))
    return out


def answer_log_probs(model: Path, spec, seqs, threads: int) -> list:
    """Per question, log-probabilities (answer tokens, vocab) of each answer position."""
    import numpy as np
    from ragrt.decoding.decoder import log_softmax
    from ragrt.decoding.generator import open_decoder
    from ragrt.runtime.sessions import SessionConfig, create_session
    decoder = open_decoder(create_session(model, SessionConfig("cpu", threads)), spec)
    out = []
    for prompt, answer in seqs:
        ids = np.array([prompt + answer])
        logits, _ = decoder.forward(decoder.empty_state(1), ids, np.ones_like(ids), num_logits=len(answer) + 1)
        out.append(log_softmax(logits[0, :-1]))
    return out


def compare(reference: list, graph: list, seqs) -> dict:
    import numpy as np
    answers = [np.array(a) for _, a in seqs]
    nll = -np.concatenate([g[np.arange(len(a)), a] for g, a in zip(graph, answers)]).mean()
    kl = np.concatenate([(np.exp(r) * (r - g)).sum(-1) for r, g in zip(reference, graph)]).mean()
    top = np.concatenate([r.argmax(-1) == g.argmax(-1) for r, g in zip(reference, graph)]).mean()
    return {"answer_nll": float(nll), "kl_to_reference": float(kl), "top1_as_reference": float(top)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True, help="gives the prompts: retrieval, k, template")
    ap.add_argument("--qa", type=Path, action="append", required=True,
                    help='JSONL of {"question", "answer"} (repeatable)')
    ap.add_argument("--reference", type=_named, required=True, help="NAME=PATH of the reference graph")
    ap.add_argument("--graph", type=_named, action="append", required=True, help="NAME=PATH (repeatable)")
    ap.add_argument("--answer-tokens", type=int, default=64, help="reference answer tokens scored (default 64)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    from ragrt import Engine
    from ragrt.errors import RagrtError
    try:
        engine = Engine.open(args.bundle, device="cpu", threads=args.threads)
        seqs = sequences(engine, args.qa, args.answer_tokens)
        spec = replace(engine.manifest.generator, batch_invariant=True, prefix_exact=True)
        name, path = args.reference
        reference = answer_log_probs(path, spec, seqs, args.threads)
        results = {name: compare(reference, reference, seqs)}
        tokens = sum(len(a) for _, a in seqs)
        print(f"{len(seqs)} questions, {tokens} answer tokens, against {name}:")
        for name, path in [args.reference] + args.graph:
            if name not in results:
                results[name] = compare(reference, answer_log_probs(path, spec, seqs, args.threads), seqs)
            r = results[name]
            print(f"  {name:16s} answer NLL {r['answer_nll']:.4f}  KL {r['kl_to_reference']:.4f}  "
                  f"top-1 as {args.reference[0]} {r['top1_as_reference']:.4f}", flush=True)
    except RagrtError as e:
        raise SystemExit(f"error: {e}") from None
    if args.json:
        from ragrt.bundle.atomic import atomic_write_text
        atomic_write_text(args.json, json.dumps({"questions": len(seqs), "answer_tokens": tokens,
                                                 "reference": args.reference[0], "graphs": results}, indent=2))


if __name__ == "__main__":
    main()
