"""A GGUF generator's language-model loss on corpus passages, under transformers' reading of the
GGUF vocabulary and under ragrt's (export/models.py), with the same weights.

    python benchmarks/gguf_tokenizer.py [--generator gemma3-270m] [--corpus data/faq/corpus.jsonl] \
        [--passages 12] [--words 120] [--json out.json]

A tokenizer that spells text as the model never saw in training shows as more tokens and a higher
loss per character (nats a character: comparable across tokenizers, unlike per-token loss).
Passages are the first `--words` words of documents drawn with `random.Random(0)`.
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, report  # noqa: E402


def run(generator: str, corpus: str, passages: int, words: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from ragrt.corpus.documents import read_documents
    from ragrt.export.models import PACKAGED_GENERATORS, _packaged_path, generator_checkpoint
    gguf = _packaged_path(generator, PACKAGED_GENERATORS[generator]) if generator in PACKAGED_GENERATORS \
        else Path(generator)
    checkpoint = generator_checkpoint(generator)
    tokenizers = {"transformers": AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name),
                  "ragrt": AutoTokenizer.from_pretrained(checkpoint)}
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    texts = [" ".join(d.text.split()[:words]) for d in random.Random(0).sample(list(read_documents(corpus)), passages)]
    rows = {}
    with torch.no_grad():
        for name, tok in tokenizers.items():
            nats = tokens = 0
            for text in texts:
                ids = torch.tensor([tok(text).input_ids])
                nats += model(ids, labels=ids).loss.item() * (ids.shape[1] - 1)
                tokens += ids.shape[1]
            chars = sum(map(len, texts))
            rows[name] = {"tokens_per_char": tokens / chars, "nats_per_char": nats / chars,
                          "example": tok.tokenize(" the general case")}
    return {"machine": machine(), "generator": generator, "passages": passages, "words": words, "rows": rows}


def markdown(res: dict) -> str:
    lines = [f"{res['generator']}, {res['passages']} passages of {res['words']} words\n",
             "| vocabulary read by | tokens a char | loss, nats a char | ' the general case' |",
             "|---|---:|---:|---|"]
    lines += [f"| {name} | {r['tokens_per_char']:.3f} | {r['nats_per_char']:.3f} | {' '.join(r['example'])} |"
              for name, r in res["rows"].items()]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--generator", default="gemma3-270m", help="a packaged generator's name or a GGUF file")
    ap.add_argument("--corpus", default="data/faq/corpus.jsonl")
    ap.add_argument("--passages", type=int, default=12)
    ap.add_argument("--words", type=int, default=120)
    ap.add_argument("--json")
    args = ap.parse_args()
    return report(run(args.generator, args.corpus, args.passages, args.words), markdown, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
