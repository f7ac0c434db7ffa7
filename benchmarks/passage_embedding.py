"""Passage embedding throughput for `ragrt export`: the export's encoder path against sentence-transformers.

    python benchmarks/passage_embedding.py --corpus data/python-docs.jsonl [--passages 1000] [--json out.json]

The passages are every n-th passage of the chunked corpus (the export's chunking: 128 tokens,
overlap 32), so their lengths are the corpus's. Every variant runs in this one process on the
same passages, one after another, each after a warm-up batch; threads are onnxruntime's
default (every core) and torch's default. `max_abs_diff` is the largest difference of any
vector component from the export's current path (the first row), which is what the index holds.

- ragrt fp32: `embed_passages` with the fp32 encoder graph and the engine's default session.
- ragrt, threads not spinning: the same session with onnxruntime's `allow_spinning` off (idle
  intra-op threads sleep instead of busy-waiting for work).
- ragrt int8 graph: the same with the int8 query graph (changes the vectors; shown for scale).
- sentence-transformers: the packaged all-MiniLM-L6-v2 in PyTorch fp32, encode(batch_size=32).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT  # noqa: E402,F401  (puts the repository on sys.path)


def sample_passages(corpus: Path, n: int):
    from tokenizers import Tokenizer

    from ragrt.corpus.documents import chunk_documents, read_documents
    from ragrt.export.models import encoder_checkpoint
    tok = Tokenizer.from_file(str(encoder_checkpoint(None) / "tokenizer.json"))
    passages = list(chunk_documents(list(read_documents(corpus)), tok, max_tokens=128, overlap=32))
    step = max(1, len(passages) // n)
    return passages[::step][:n]


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, required=True)
    ap.add_argument("--passages", type=int, default=1000)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import onnxruntime as ort

    from ragrt.export.index import embed_passages
    from ragrt.export.models import encoder_checkpoint
    from ragrt.export.pipeline import encoder_graphs
    from ragrt.retrieval.encoder import TextEncoder
    from ragrt.retrieval.passages import passage_text

    passages = sample_passages(args.corpus, args.passages)
    texts = [passage_text(p) for p in passages]
    ckpt = encoder_checkpoint(None)
    graphs = encoder_graphs(ckpt)
    meta = json.loads((graphs / "meta.json").read_text())
    lengths = [len(e.ids) for e in TextEncoder(graphs / "fp32" / "model.onnx", graphs / "tokenizer.json",
                                               max_length=meta["max_length"], dim=meta["dim"]
                                               ).tokenizer.encode_batch(texts)]
    print(f"{len(texts)} passages, {np.mean(lengths):.1f} tokens on average (max {max(lengths)})")
    rows = []

    def record(name, vectors, seconds, reference):
        diff = float(np.abs(vectors - reference).max()) if reference is not None else 0.0
        rows.append({"variant": name, "passages_per_s": round(len(texts) / seconds, 1), "seconds": round(seconds, 2),
                     "max_abs_diff": diff})
        print(f"{name:44s} {len(texts) / seconds:7.1f} passages/s  ({seconds:.1f} s, max |diff| {diff:.2e})", flush=True)

    def encoder(variant, spinning=True):
        enc = TextEncoder(graphs / variant / "model.onnx", graphs / "tokenizer.json", max_length=meta["max_length"],
                          dim=meta["dim"])
        if not spinning:
            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            opts.inter_op_num_threads = 1
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            enc.session = ort.InferenceSession(str(graphs / variant / "model.onnx"), opts,
                                               providers=["CPUExecutionProvider"])
        enc.embed_all(texts[:32])                              # warm-up
        return enc

    reference, s = timed(lambda: embed_passages(passages, encoder("fp32"), progress=False))
    record("ragrt fp32 (export default)", reference, s, None)
    vectors, s = timed(lambda: embed_passages(passages, encoder("fp32", spinning=False), progress=False))
    record("ragrt fp32, threads not spinning", vectors, s, reference)
    vectors, s = timed(lambda: embed_passages(passages, encoder("int8"), progress=False))
    record("ragrt int8 graph", vectors, s, reference)

    from sentence_transformers import SentenceTransformer
    st = SentenceTransformer(str(ckpt), device="cpu")
    st.max_seq_length = meta["max_length"]
    st.encode(texts[:32], batch_size=32)
    vectors, s = timed(lambda: st.encode(texts, batch_size=32, normalize_embeddings=True))
    record("sentence-transformers fp32, batch 32", np.asarray(vectors, dtype=np.float32), s, reference)
    if args.json:
        args.json.write_text(json.dumps({"passages": len(texts), "corpus": str(args.corpus), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
