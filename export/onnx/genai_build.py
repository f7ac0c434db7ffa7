"""Runs onnxruntime-genai's model builder under the transformers 4.57 that optimum needs.

The builder (onnxruntime-genai 0.18) writes the fused decoder graph we want: GroupQueryAttention
with rotary embeddings inside, fused RMSNorm, and int4 MatMulNBits. It is written against
transformers 5 and fails to import under 4.57 for two reasons, both patched here and nowhere
else: it imports model classes that 4.57 lacks (none of them llama's), and it reads rotary
settings from `config.rope_parameters`, which 4.57 keeps as `rope_theta` / `rope_scaling`.

    python -m ragrt.export.onnx.genai_build -i HF_DIR -o OUT -p int4 -e cpu -c CACHE
"""
import runpy
import sys

MISSING_IN_4_57 = ("Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration")


def _patch_transformers() -> None:
    import transformers
    # Touching an attribute can make transformers swap its lazy module in sys.modules, so the
    # names go on whatever module `from transformers import` will see.
    transformers.AutoConfig
    module = sys.modules["transformers"]
    for name in MISSING_IN_4_57:
        if not hasattr(module, name):
            setattr(module, name, None)
    original = module.AutoConfig.from_pretrained

    def from_pretrained(*args, **kwargs):
        config = original(*args, **kwargs)
        if getattr(config, "rope_scaling", 0) is None:
            del config.rope_scaling
            config.rope_parameters = {"rope_type": "default", "rope_theta": config.rope_theta}
        return config

    module.AutoConfig.from_pretrained = from_pretrained


if __name__ == "__main__":
    _patch_transformers()
    sys.argv = ["onnxruntime_genai.models.builder", *sys.argv[1:]]
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__")
