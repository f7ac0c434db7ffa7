"""Where a decode step's time goes: onnxruntime's own per-operator share of kernel time for
one bundle's generator, stepping one row (or --rows rows, as the server's batcher does) at
several context lengths, or, with --prefill, prefilling prompts of those lengths: the time to
first token.

    python benchmarks/step_profile.py BUNDLE [--context 32 320 700] [--rows 1] [--steps 40] [--threads 2] [--prefill]

The engine's decoder drives the session (buffers bound in place, as in `ask`), so the
profile is of the real step. Profiling slows the kernels it watches too, so it gives each
operator's share of kernel time, and a second, unprofiled session gives the time per step.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
import time
from pathlib import Path


def _timed_steps(decoder, context: int, steps: int, prefill: bool = False, rows: int = 1) -> float:
    """Seconds per step of `rows` rows after a `context`-token prompt each (three untimed steps
    first), or per prefill of that prompt."""
    import numpy as np
    prompt = [int(t) for t in np.random.default_rng(0).integers(100, decoder.spec.vocab_size, context)]
    logits, state = decoder.prefill([prompt] * (1 if prefill else rows))
    if prefill:
        start = time.perf_counter()
        for _ in range(steps):
            decoder.prefill([prompt])
        return (time.perf_counter() - start) / steps
    for _ in range(3):
        logits, state = decoder.step(state, logits.argmax(-1))
    start = time.perf_counter()
    for _ in range(steps):
        logits, state = decoder.step(state, logits.argmax(-1))
    return (time.perf_counter() - start) / steps


def profile(bundle: Path, spec, context: int, steps: int, threads: int, prefill: bool = False, rows: int = 1) -> dict:
    """The graph that runs the timed passes is profiled: the model for prefill, the step graph
    (where the bundle has one) for steps."""
    import onnxruntime as ort
    from ragrt.decoding.generator import load_decoder, open_decoder
    from ragrt.decoding.kvquant import load_kv_scales
    from ragrt.runtime.sessions import SessionConfig, create_session
    config = SessionConfig("cpu", threads)
    wall = _timed_steps(load_decoder(bundle, spec, config), context, steps, prefill, rows)
    profiled = spec.model if prefill or not spec.step_model else spec.step_model
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        opts.profile_file_prefix = os.path.join(tmp, "step")
        session = ort.InferenceSession(str(bundle / profiled), opts, providers=["CPUExecutionProvider"])
        if profiled == spec.model:
            step = create_session(bundle / spec.step_model, config) if spec.step_model else None
            decoder = open_decoder(session, spec, load_kv_scales(bundle, spec), step)
        else:
            decoder = open_decoder(create_session(bundle / spec.model, config), spec, load_kv_scales(bundle, spec), session)
        _timed_steps(decoder, context, steps, prefill, rows)
        events = json.loads(Path(session.end_profiling()).read_text())
    # Only the timed passes: the last `steps` runs of the profile (a row prefills in one run).
    first = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"][-steps]["ts"]
    per_op: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= first:
            per_op[e["args"]["op_name"]] += e["dur"] / steps / 1e3
    kernels = sum(per_op.values())
    return {"context": context, "rows": rows, "step_ms": wall * 1e3,
            "kernel_share": {op: ms / kernels for op, ms in per_op.most_common()}}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--context", type=int, nargs="+", default=[32, 320, 700],
                    help="prompt lengths to step after (default: 32 320 700)")
    ap.add_argument("--steps", type=int, default=40, help="timed steps (or prefills) per context length")
    ap.add_argument("--rows", type=int, default=1, help="rows stepping together (default: 1)")
    ap.add_argument("--prefill", action="store_true", help="profile prefilling the prompt instead of stepping after it")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    from ragrt.errors import RagrtError
    from ragrt.bundle.manifest import read_manifest
    try:
        spec = read_manifest(args.bundle).generator
    except RagrtError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"{args.bundle} ({spec.quantization}, {args.threads} threads):")
    for n in args.context:
        r = profile(args.bundle, spec, n, args.steps, args.threads, args.prefill, args.rows)
        top = ", ".join(f"{op} {share:.0%}" for op, share in list(r["kernel_share"].items())[:4])
        what = "per prefill" if args.prefill else f"per step of {args.rows} row(s)"
        print(f"  context {n:5d}: {r['step_ms']:.2f} ms {what}; kernel time: {top}", flush=True)


if __name__ == "__main__":
    main()
