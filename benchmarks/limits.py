"""The physical limits of generation on this machine: decode is bound by memory bandwidth, prefill by FLOPs.

    python benchmarks/limits.py [--prompt-tokens 315] [--threads 2] [--json limits.json]

Decode: each new token reads every weight once (the tied embedding too, as the LM head), so
tokens/s can be at most bandwidth / bytes of weights. Bandwidth is measured here: a 1 GiB
float32 numpy copy split over `--threads` threads, counted as bytes read + bytes written
(and, for reference, a read-only pass). Prefill: a prompt of T tokens costs about
2 * params * T FLOPs (a multiply and an add per weight per token); more exactly, the LM head
runs for the last position only (num_logits=1) and attention adds 2 * layers * T^2 * d_model.
Divided into the CPU's peak (cores * 2 FMA pipes * 8 fp32 lanes * 2 FLOPs * clock) that is the
floor on time to first token. int8 dot products (AVX-512 VNNI / AVX-VNNI: vpdpbusd does 4x the
fp32 multiply-adds per instruction) raise the peak 4x where the kernels use them.
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, report  # noqa: E402

# SmolLM2-135M(-Instruct)'s config.json, the packaged generator.
SMOLLM2_135M = {"num_hidden_layers": 30, "hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3,
                "head_dim": 64, "intermediate_size": 1536, "vocab_size": 49152, "tie_word_embeddings": True}

# Bytes per weight as the bundle stores them: MatMulNBits keeps one fp32 scale per block
# (symmetric: no zero points). The fused graph's int8 and int4 come in blocks of 32
# (export/onnx/graphs.py); w8a8 has one fp32 scale per output column (export/quant/rowquant.py), a
# rounding error here.
PRECISIONS = {"fp32": 4.0, "int8": 1 + 4 / 32, "w8a8": 1.0, "int4": 0.5 + 4 / 32}


def parameters(cfg: dict = SMOLLM2_135M) -> dict:
    """Parameter counts of a llama-style decoder."""
    d, layers, f = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]
    hd = cfg.get("head_dim") or d // cfg["num_attention_heads"]
    q = d * cfg["num_attention_heads"] * hd
    kv = 2 * d * cfg["num_key_value_heads"] * hd
    o = cfg["num_attention_heads"] * hd * d
    mlp = 3 * d * f
    per_layer_matmul = q + kv + o + mlp
    norms = layers * 2 * d + d
    embedding = cfg["vocab_size"] * d
    lm_head = 0 if cfg.get("tie_word_embeddings", True) else embedding
    total = layers * per_layer_matmul + norms + embedding + lm_head
    return {"total": total, "layers_matmul": layers * per_layer_matmul, "per_layer_matmul": per_layer_matmul,
            "embedding": embedding, "lm_head_untied": lm_head, "norms": norms,
            # read per decoded token: every matmul weight, the (tied) LM head, one embedding row
            "read_per_token": layers * per_layer_matmul + embedding + norms + d,
            "kv_bytes_per_position_fp32": 2 * layers * cfg["num_key_value_heads"] * hd * 4}


def bandwidth(gib: float = 1.0, threads: int = 2, repeats: int = 3) -> dict:
    """GB/s of a float32 copy (read + write counted) and of a read-only sum, split over `threads` threads."""
    n = int(gib * 2**30 / 4)
    src = np.ones(n, np.float32)
    dst = np.zeros(n, np.float32)
    parts = np.array_split(np.arange(n), threads)
    bounds = [(int(p[0]), int(p[-1]) + 1) for p in parts]

    def timed(work) -> float:
        best = float("inf")
        for _ in range(repeats):
            ts = [threading.Thread(target=work, args=b) for b in bounds]
            t = time.perf_counter()
            for th in ts:
                th.start()
            for th in ts:
                th.join()
            best = min(best, time.perf_counter() - t)
        return best

    copy_s = timed(lambda a, b: np.copyto(dst[a:b], src[a:b]))       # numpy releases the GIL while copying
    read_s = timed(lambda a, b: src[a:b].sum(dtype=np.float32))
    return {"bytes": src.nbytes, "threads": threads, "copy_gb_s": 2 * src.nbytes / copy_s / 1e9,
            "read_gb_s": src.nbytes / read_s / 1e9}


def peak_flops(cores: int, ghz: float, fma_units: int = 2, fp32_lanes: int = 8) -> float:
    """FLOP/s: cores * FMA pipes * fp32 lanes per pipe (256-bit: 8) * 2 (multiply + add) * clock."""
    return cores * fma_units * fp32_lanes * 2 * ghz * 1e9


def limits(*, bw_gb_s: float, cores: int, ghz: float, prompt_tokens: int = 315, context: int = 315,
           cfg: dict = SMOLLM2_135M) -> dict:
    p = parameters(cfg)
    layers, d = cfg["num_hidden_layers"], cfg["hidden_size"]
    decode = {}
    for name, bpp in PRECISIONS.items():
        weights = p["read_per_token"] * bpp
        kv = p["kv_bytes_per_position_fp32"] * context
        decode[name] = {"bytes_per_param": bpp, "weight_mb_per_token": weights / 1e6,
                        "kv_mb_per_token": kv / 1e6,
                        "ceiling_tok_s": bw_gb_s * 1e9 / weights,
                        "ceiling_tok_s_with_kv": bw_gb_s * 1e9 / (weights + kv)}
    simple = 2 * p["total"] * prompt_tokens
    exact = (2 * (p["layers_matmul"]) * prompt_tokens + 2 * p["embedding"]            # LM head: last position
             + 2 * layers * prompt_tokens ** 2 * cfg["num_attention_heads"] * (cfg.get("head_dim") or 64))
    fp32_peak = peak_flops(cores, ghz)
    return {"params": p, "bandwidth_gb_s": bw_gb_s, "decode": decode, "prompt_tokens": prompt_tokens,
            "context_for_kv": context, "prefill_gflop_2_params_tokens": simple / 1e9,
            "prefill_gflop": exact / 1e9, "peak_gflop_s_fp32": fp32_peak / 1e9,
            "peak_gflop_s_int8_vnni": 4 * fp32_peak / 1e9,
            "ttft_floor_ms_fp32": exact / fp32_peak * 1e3, "ttft_floor_ms_int8_vnni": exact / (4 * fp32_peak) * 1e3,
            "cores": cores, "ghz": ghz, "hidden": d}


def run(*, threads: int = 2, gib: float = 1.0, prompt_tokens: int = 315) -> dict:
    m = machine()
    ghz = (m.get("lscpu_max_mhz") or m.get("mhz") or 0) / 1000
    bw = bandwidth(gib, threads)
    return {"machine": m, "measured": bw, **limits(bw_gb_s=bw["copy_gb_s"], cores=threads, ghz=ghz,
                                                   prompt_tokens=prompt_tokens, context=prompt_tokens)}


def markdown(res: dict) -> str:
    p = res["params"]
    lines = [f"SmolLM2-135M: {p['total'] / 1e6:.1f}M parameters ({p['layers_matmul'] / 1e6:.1f}M in the 30 layers' "
             f"matmuls, {p['embedding'] / 1e6:.1f}M in the tied embedding / LM head); "
             f"{p['read_per_token'] / 1e6:.1f}M read per decoded token.",
             f"Measured bandwidth ({res['measured']['threads']} threads, {res['measured']['bytes'] / 2**30:.0f} GiB): "
             f"copy {res['measured']['copy_gb_s']:.1f} GB/s (read + write), read-only {res['measured']['read_gb_s']:.1f} GB/s.",
             "", "| weights | bytes/param | MB read per token | decode ceiling tok/s | with the fp32 KV cache of "
             f"{res['context_for_kv']} positions |", "|---|---|---|---|---|"]
    for name, r in res["decode"].items():
        lines.append(f"| {name} | {r['bytes_per_param']:.3f} | {r['weight_mb_per_token']:.0f} | "
                     f"{r['ceiling_tok_s']:.0f} | {r['ceiling_tok_s_with_kv']:.0f} |")
    lines += ["", f"Prefill of {res['prompt_tokens']} tokens: 2·params·tokens = "
                  f"{res['prefill_gflop_2_params_tokens']:.1f} GFLOP; counting the LM head once (num_logits=1) and "
                  f"attention: {res['prefill_gflop']:.1f} GFLOP. Peak of {res['cores']} cores at {res['ghz']:.2f} GHz: "
                  f"{res['peak_gflop_s_fp32']:.0f} GFLOP/s fp32 (int8 VNNI: {res['peak_gflop_s_int8_vnni']:.0f}). "
                  f"Time-to-first-token floor: {res['ttft_floor_ms_fp32']:.0f} ms fp32, "
                  f"{res['ttft_floor_ms_int8_vnni']:.0f} ms int8 VNNI."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--gib", type=float, default=1.0)
    p.add_argument("--prompt-tokens", type=int, default=315)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    res = run(threads=args.threads, gib=args.gib, prompt_tokens=args.prompt_tokens)
    return report(res, markdown, args.json)


if __name__ == "__main__":
    sys.exit(main())
