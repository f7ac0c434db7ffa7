"""Time to first token and decode speed: ragrt's engine against transformers' PyTorch `generate()`.

Same weights, same prompt, same number of greedy tokens, same threads, one engine after the
other in one process, median of the runs. Usage:

    python benchmarks/generation.py --bundle bundles/pydocs [--threads 2] [--prompt-tokens 320]
        [--new-tokens 64] [--runs 5] [--json out.json]

The PyTorch side loads the checkpoint the bundle was exported from (the packaged SmolLM2,
converted and cached by `ragrt export`), or `--checkpoint DIR`.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path


def build_prompt(engine, prompt_tokens: int) -> list[int]:
    """A real RAG prompt: passages from the bundle's store, filled up to about `prompt_tokens`."""
    from engine.prompt import PassageText, PromptBuilder
    store = engine.retriever.store
    builder = PromptBuilder(engine.manifest.prompt, engine.tokenizer, budget=prompt_tokens)
    passages = [PassageText(store.get(i).title, store.get(i).text) for i in range(min(len(store), 16))]
    return builder.build("How do I remove duplicates from a list while keeping the order?", passages).ids


def time_ragrt(decoder, prompt: list[int], new_tokens: int, runs: int) -> dict:
    ttft, decode = [], []
    for _ in range(runs + 1):                       # the first run warms up and is dropped
        t0 = time.perf_counter()
        logits, state = decoder.prefill([prompt])
        token = logits.argmax(-1)
        t1 = time.perf_counter()
        for _ in range(new_tokens - 1):             # no EOS stop: every engine makes the same count
            logits, state = decoder.step(state, token)
            token = logits.argmax(-1)
        t2 = time.perf_counter()
        ttft.append(t1 - t0)
        decode.append((new_tokens - 1) / (t2 - t1))
    return {"ttft_ms": statistics.median(ttft[1:]) * 1e3, "decode_tok_s": statistics.median(decode[1:])}


def time_torch(checkpoint: Path, prompt: list[int], new_tokens: int, runs: int, threads: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    mask = torch.ones_like(ids)

    def gen(n: int) -> float:
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           num_beams=1, pad_token_id=0)
        return time.perf_counter() - t

    ttft, decode = [], []
    for _ in range(runs + 1):
        first = gen(1)
        full = gen(new_tokens)
        ttft.append(first)
        decode.append((new_tokens - 1) / max(full - first, 1e-9))
    return {"ttft_ms": statistics.median(ttft[1:]) * 1e3, "decode_tok_s": statistics.median(decode[1:])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--checkpoint", default=None, help="HF dir for PyTorch (default: the packaged SmolLM2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=320)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    from engine import Engine
    from export.models import generator_checkpoint
    engine = Engine.open(args.bundle, device="cpu", threads=args.threads)
    prompt = build_prompt(engine, args.prompt_tokens)
    checkpoint = generator_checkpoint(args.checkpoint)

    results = {
        "machine": f"{platform.processor() or platform.machine()}, {args.threads} threads",
        "prompt_tokens": len(prompt), "new_tokens": args.new_tokens, "runs": args.runs,
        "engines": {
            f"ragrt {engine.manifest.generator.quantization} (onnxruntime)": time_ragrt(engine.decoder, prompt, args.new_tokens, args.runs),
            "transformers PyTorch fp32 generate()": time_torch(checkpoint, prompt, args.new_tokens, args.runs, args.threads),
        },
    }
    base = results["engines"]["transformers PyTorch fp32 generate()"]
    print(f"prompt {len(prompt)} tokens, {args.new_tokens} greedy tokens, {args.threads} threads, median of {args.runs}")
    print(f"{'engine':45s} {'TTFT ms':>9s} {'decode tok/s':>13s} {'TTFT ratio':>11s} {'decode ratio':>13s}")
    for name, r in results["engines"].items():
        print(f"{name:45s} {r['ttft_ms']:9.0f} {r['decode_tok_s']:13.1f} "
              f"{base['ttft_ms'] / r['ttft_ms']:10.2f}x {r['decode_tok_s'] / base['decode_tok_s']:12.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
