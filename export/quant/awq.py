"""Activation-aware scaling (AWQ) of a Llama-style checkpoint, before int4 in blocks of 32.

int4 in blocks of 32 is what onnxruntime's fast MatMulNBits kernel decodes, but rounded to
nearest it lost too much on SmolLM2 (teacher-forced top-1 0.773 against PyTorch). AWQ
multiplies each weight's input channel by s and divides the activation feeding it by s. In
fp32 that computes the same function; int4 rounding then falls more lightly on the channels
that carry large activations. The division is folded into what produces the activation, so
the graph gains no op:
- before q/k/v and before gate/up: the RMSNorm weight;
- before down: up_proj's output rows (the MLP's gated product is linear in them);
- before o: v_proj's output rows, so s is shared by the query heads that read one key/value
  head. That changes what the graph caches, so a graph that reads another graph's cache (the
  int4 step graph beside an int8 prefill graph, `keep_values`) leaves o_proj unscaled.
s = mean|x|^a per channel, with a searched per group on calibration prompts to minimise the
group's output error under simulated int4 rounding (onnxruntime's symmetric blocks of 32).
The tied LM head keeps its rows: scaling them would change the embedding table too.

Measured on SmolLM2-135M (20 parity prompts x 24 tokens, teacher-forced top-1 against
PyTorch): 0.825 with this scaling in blocks of 32, against 0.773 without it and 0.812 for plain
blocks of 16, which decoded about a third slower at batch 1. Clipping each block's range as
AWQ also does scored 0.796 on these six calibration prompts, so it is left out. The builder's
rounding to nearest is then replaced by GPTQ's (gptq.py).
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ragrt.errors import RagrtError

BLOCK = 32
ALPHAS = np.linspace(0.0, 1.0, 21)
MAX_TOKENS = 4096                # calibration tokens kept per activation
AWQ_MODEL_TYPES = ("llama", "mistral", "qwen2")     # the layer layout the groups below name


@dataclass(frozen=True)
class AwqReport:
    tokens: int                                   # calibration tokens
    alphas: dict[str, list[float]]                # per group kind, one alpha per layer
    error_ratio: float                            # simulated int4 output error, scaled over unscaled


def int4_blocks(w):
    """w (out, in) rounded as onnxruntime's symmetric int4 blocks of 32 along `in`: the value
    of largest magnitude in each block maps to -8."""
    import torch
    out, n = w.shape
    pad = -n % BLOCK
    b = torch.nn.functional.pad(w, (0, pad)).reshape(out, -1, BLOCK)
    scale = int4_scales(b)
    return (torch.clamp(torch.round(b / scale), -8, 7) * scale).reshape(out, -1)[:, :n]


def int4_scales(blocks):
    """onnxruntime's symmetric int4 scale of each block along the last axis (kept, size 1):
    the block's value of largest magnitude maps to -8."""
    import torch
    m = torch.gather(blocks, -1, blocks.abs().argmax(-1, keepdim=True))
    return torch.where(m == 0, torch.ones_like(m), m / -8.0)


def _error(x, weights, s) -> float:
    return sum(float(((x / s) @ int4_blocks(w * s).T - x @ w.T).pow(2).sum()) for w in weights)


def _search(x, weights, mean, expand):
    """The s = mean^a (normalised around 1) with the least int4 output error, and its errors."""
    import torch
    best = (torch.ones_like(mean), 0.0, _error(x, weights, torch.ones_like(expand(mean))))
    base = best[2]
    for a in ALPHAS[1:]:
        s = mean.clamp(min=1e-4) ** float(a)
        s = s / (s.max() * s.min()).sqrt()
        err = _error(x, weights, expand(s))
        if err < best[2]:
            best = (s, float(a), err)
    return best[0], best[1], best[2], base


def _divide_outputs(linear, s) -> None:
    """linear's outputs over s: its weight rows, and its bias where it has one (Qwen2's v_proj)."""
    linear.weight.div_(s[:, None])
    if linear.bias is not None:
        linear.bias.div_(s)


def visit_projection_inputs(model, prompts: list[list[int]], visit) -> None:
    """Runs the prompts and calls visit((layer, kind), x) with each input x (tokens, channels)
    of q_proj (= k, v: kind "qkv"), o_proj ("o"), gate_proj (= up: "gate_up") and down_proj."""
    import torch

    def hook_for(key):
        def hook(_module, inputs):
            visit(key, inputs[0].reshape(-1, inputs[0].shape[-1]))
        return hook

    hooks = []
    for i, layer in enumerate(model.model.layers):
        for kind, module in (("qkv", layer.self_attn.q_proj), ("o", layer.self_attn.o_proj),
                             ("gate_up", layer.mlp.gate_proj), ("down", layer.mlp.down_proj)):
            hooks.append(module.register_forward_pre_hook(hook_for((i, kind))))
    try:
        for ids in prompts:
            model(torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()


def _calibration_inputs(model, prompts: list[list[int]]) -> dict[tuple[int, str], object]:
    import torch
    caught: dict[tuple[int, str], list] = {}
    visit_projection_inputs(model, prompts, lambda key, x: caught.setdefault(key, []).append(x))
    return {k: torch.cat(v)[:MAX_TOKENS] for k, v in caught.items()}


def scale_checkpoint(checkpoint: Path, out: Path, prompts: list[list[int]], *, keep_values: bool = False) -> AwqReport:
    """Writes to `out` a copy of the checkpoint with AWQ scales folded in (same fp32 function);
    `keep_values` keeps v_proj's outputs, and so the cached values, the checkpoint's."""
    import torch
    from transformers import AutoModelForCausalLM

    if not prompts:
        raise RagrtError("AWQ scaling needs at least one calibration prompt")
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    cfg = model.config
    if cfg.model_type not in AWQ_MODEL_TYPES:
        raise RagrtError(f"int4 scaling supports Llama-style generators, not {cfg.model_type!r}")
    heads, kv_heads = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    group = heads // kv_heads

    def per_query_head(s):          # (kv_heads * head_dim,) -> (heads * head_dim,)
        return s.reshape(kv_heads, 1, head_dim).expand(-1, group, -1).reshape(-1)

    def same(s):
        return s

    def groups(i, layer, inputs):
        """(kind, x, weights fed x, channel means, s to the weights' width, fold of 1/s into x's source)."""
        attn, mlp = layer.self_attn, layer.mlp
        x_qkv, x_o, x_gu, x_down = (inputs[(i, k)] for k in ("qkv", "o", "gate_up", "down"))
        yield ("qkv", x_qkv, [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight],
               x_qkv.abs().mean(0), same, lambda s: layer.input_layernorm.weight.div_(s))
        if not keep_values:
            yield ("o", x_o, [attn.o_proj.weight],
                   x_o.abs().mean(0).reshape(kv_heads, group, head_dim).mean(1).reshape(-1), per_query_head,
                   lambda s: _divide_outputs(attn.v_proj, s))
        yield ("gate_up", x_gu, [mlp.gate_proj.weight, mlp.up_proj.weight],
               x_gu.abs().mean(0), same, lambda s: layer.post_attention_layernorm.weight.div_(s))
        yield ("down", x_down, [mlp.down_proj.weight],
               x_down.abs().mean(0), same, lambda s: _divide_outputs(mlp.up_proj, s))

    alphas: dict[str, list[float]] = {"qkv": [], "o": [], "gate_up": [], "down": []}
    scaled_err = base_err = 0.0
    with torch.no_grad():
        inputs = _calibration_inputs(model, prompts)
        for i, layer in enumerate(model.model.layers):
            for kind, x, weights, mean, expand, fold in groups(i, layer, inputs):
                s, a, err, base = _search(x, weights, mean, expand)
                fold(s)
                for w in weights:
                    w.mul_(expand(s))
                alphas[kind].append(a)
                scaled_err, base_err = scaled_err + err, base_err + base
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    for f in checkpoint.iterdir():       # tokenizer, chat template, generation config
        if f.is_file() and not (out / f.name).exists() and f.suffix not in (".safetensors", ".bin"):
            shutil.copyfile(f, out / f.name)
    return AwqReport(tokens=int(inputs[(0, "qkv")].shape[0]), alphas=alphas,
                     error_ratio=scaled_err / base_err if base_err else 1.0)
