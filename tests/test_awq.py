"""AWQ scaling before int4 (export/awq.py), on the tiny llama."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")


def _load(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def salient(tiny_generator_dir, tmp_path_factory):
    """The tiny llama with a few large activation channels, like a trained model's, and its
    AWQ-scaled copy: (original dir, scaled dir, report, calibration prompts)."""
    from ragrt.export.quant.awq import scale_checkpoint
    model = _load(tiny_generator_dir)
    rng = np.random.default_rng(0)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[rng.choice(norm.weight.numel(), 3, replace=False)] *= 12.0
    original = tmp_path_factory.mktemp("salient")
    model.save_pretrained(original)
    prompts = [rng.integers(3, model.config.vocab_size, n).tolist() for n in (40, 64, 25)]
    scaled = tmp_path_factory.mktemp("awq")
    return original, scaled, scale_checkpoint(original, scaled, prompts), prompts


def test_scaling_keeps_the_function_of_projections_with_biases(tmp_path):
    """Qwen2-style q/k/v biases and an MLP bias: dividing v's or up's outputs divides their bias too."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ragrt.export.quant.awq import scale_checkpoint
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    model.save_pretrained(tmp_path / "biased")
    prompts = [list(range(3, 40)), list(range(50, 90))]
    scale_checkpoint(tmp_path / "biased", tmp_path / "scaled", prompts)
    a, b = _logits(_load(tmp_path / "biased"), prompts), _logits(_load(tmp_path / "scaled"), prompts)
    assert torch.allclose(a, b, atol=1e-4 * float(a.abs().max()))


def _logits(model, prompts):
    with torch.no_grad():
        return torch.cat([model(torch.tensor([p])).logits[0] for p in prompts])


def _int4(model):
    """The model with every layer weight rounded as onnxruntime's int4 blocks of 32 round it."""
    from ragrt.export.quant.awq import int4_blocks
    with torch.no_grad():
        for layer in model.model.layers:
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                        layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                lin.weight.copy_(int4_blocks(lin.weight))
    return model


def test_scaling_keeps_the_fp32_function(salient):
    original, scaled, _, prompts = salient
    a, b = _logits(_load(original), prompts), _logits(_load(scaled), prompts)
    assert torch.allclose(a, b, atol=1e-4 * float(a.abs().max()))


def _values(model, prompts):
    """Each layer's v_proj outputs: what the graph caches as values."""
    caught = []
    hooks = [layer.self_attn.v_proj.register_forward_hook(lambda _m, _i, out: caught.append(out[0]))
             for layer in model.model.layers]
    with torch.no_grad():
        for p in prompts:
            model(torch.tensor([p]))
    for h in hooks:
        h.remove()
    return torch.cat(caught)


def test_keep_values_caches_what_the_checkpoint_caches(salient, tmp_path):
    """The int4 step graph decodes on a cache the int8 graph prefilled, so its AWQ must leave the
    cached values alone: the default folds o_proj's scales into them, `keep_values` does not."""
    from ragrt.export.quant.awq import scale_checkpoint
    original, scaled, _, prompts = salient
    report = scale_checkpoint(original, tmp_path / "kept", prompts, keep_values=True)
    reference = _values(_load(original), prompts)
    kept = _values(_load(tmp_path / "kept"), prompts)
    assert torch.allclose(kept, reference, atol=1e-4 * float(reference.abs().max()))
    assert not torch.allclose(_values(_load(scaled), prompts), reference, atol=1e-2 * float(reference.abs().max()))
    assert report.alphas["o"] == [] and any(a > 0 for a in report.alphas["qkv"] + report.alphas["gate_up"])
    a, b = _logits(_load(original), prompts), _logits(_load(tmp_path / "kept"), prompts)
    assert torch.allclose(a, b, atol=1e-4 * float(a.abs().max()))


def test_scaling_lowers_the_int4_error(salient):
    original, scaled, report, prompts = salient
    reference = _logits(_load(original), prompts)
    plain = float((_logits(_int4(_load(original)), prompts) - reference).norm())
    awq = float((_logits(_int4(_load(scaled)), prompts) - reference).norm())
    assert awq < 0.8 * plain
    assert report.error_ratio < 0.8 and report.tokens == sum(len(p) for p in prompts)
    assert any(a > 0 for a in report.alphas["qkv"] + report.alphas["gate_up"])


def test_int4_blocks_round_as_onnxruntime_does():
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    from ragrt.export.quant.awq import int4_blocks
    rng = np.random.default_rng(1)
    k, n, block = 96, 40, 32
    w = rng.standard_normal((k, n)).astype(np.float32)          # an ONNX MatMul weight (in, out)
    packed = np.zeros((n, k // block, block // 2), np.uint8)
    scales = np.zeros(n * (k // block), np.float32)
    zero_points = np.zeros(n * ((k // block + 1) // 2), np.uint8)
    quantize_matmul_4bits(packed, w, scales, zero_points, block, n, k, True)
    q = np.stack([packed & 0xF, packed >> 4], -1).reshape(n, k // block, block).astype(np.int32) - 8
    ort = (q * scales.reshape(n, k // block, 1)).reshape(n, k)
    ours = int4_blocks(torch.from_numpy(w.T.copy())).numpy()
    np.testing.assert_allclose(ours, ort, rtol=0, atol=1e-6)
