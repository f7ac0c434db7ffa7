"""Peak RSS of a bundle's generator session alone: load, prefill a prompt, decode greedily.

    python benchmarks/generator_rss.py BUNDLE [--prompt-tokens 315] [--new-tokens 64] [--threads 2]

The generation benchmark's RSS is a whole worker (encoder, index, prefix cache, imports);
this isolates the generator (its step graph too, where the bundle has one), the figure issue
4's 300 MB goal is about. Run it once per bundle: ru_maxrss is a process's peak, so one
process measures one bundle.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import memory  # noqa: E402  (puts the repository on sys.path too)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--prompt-tokens", type=int, default=315)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    import numpy as np
    import onnxruntime  # noqa: F401  (counted in the baseline)
    baseline = memory()["peak_rss_mib"]
    from ragrt.decoding.generator import load_decoder
    from ragrt.bundle.manifest import read_manifest
    from ragrt.runtime.sessions import SessionConfig
    from ragrt.errors import RagrtError
    try:
        spec = read_manifest(args.bundle).generator
        decoder = load_decoder(args.bundle, spec, SessionConfig("cpu", args.threads))     # its step graph too
    except RagrtError as e:
        raise SystemExit(f"error: {e}") from None
    prompt = [int(t) for t in np.random.default_rng(0).integers(100, spec.vocab_size, args.prompt_tokens)]
    logits, state = decoder.prefill([prompt])
    for _ in range(args.new_tokens):
        logits, state = decoder.step(state, logits.argmax(-1))
    print(f"{args.bundle} ({spec.quantization}): peak RSS {memory()['peak_rss_mib']:.0f} MB "
          f"(of which the imports, before the session: {baseline:.0f} MB)")


if __name__ == "__main__":
    main()
