"""Tiny random models and tokenizers, built in code, for tests of the mechanics (no downloads)."""
from __future__ import annotations

from pathlib import Path

TEXT = """Python lists are mutable sequences. A tuple is an immutable sequence.
Use list.copy() or a slice to copy a list. dict.fromkeys removes duplicates in order.
The json module parses JSON documents. open() returns a file object; use a with statement.
Generators yield values lazily. The GIL lets one thread run Python bytecode at a time.
""" * 4

CHAT_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                 "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _chat_tokenizer():
    """A byte-level BPE tokenizer trained on TEXT, with ChatML's special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                     pad_token="<|im_end|>", unk_token="<|endoftext|>")
    hf_tok.chat_template = CHAT_TEMPLATE
    return hf_tok


# The generator shapes users bring, each as small as its architecture allows. Every one is a
# GQA decoder of 4 heads over 2 KV heads; what differs is what passage KV must know to turn keys.
GENERATOR_SHAPES = {
    "llama": {},
    "qwen2": {},
    # Phi-4-mini's partial rotary: only the first half of each head's dims is rotated.
    # Heads of 32 dims: onnxruntime's fused rotary takes at least 16 rotated dims.
    "phi3": {"partial_rotary_factor": 0.5, "original_max_position_embeddings": 512, "hidden_size": 128},
    # Llama 3.x's scaled rotary: low frequencies stretched by 8, over an original context of 64.
    "llama3-rope": {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
    # Gemma 3: a sliding-window layer (window 24, its own rotary base) then a global one.
    "gemma3": {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 24,
               "rope_theta": 1e6, "rope_local_base_freq": 1e4, "query_pre_attn_scalar": 16, "head_dim": 16},
}


def make_generator(out: Path, *, layers: int = 2, seed: int = 0, shape: str = "llama") -> Path:
    """A decoder of one of GENERATOR_SHAPES (default: llama, as SmolLM2) with a byte-level BPE
    tokenizer and chat template, random weights."""
    import torch
    from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, Phi3Config,
                              Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM)

    hf_tok = _chat_tokenizer()
    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "llama3-rope": (LlamaConfig, LlamaForCausalLM),
               "qwen2": (Qwen2Config, Qwen2ForCausalLM), "phi3": (Phi3Config, Phi3ForCausalLM),
               "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM)}
    config_class, model_class = classes[shape]
    torch.manual_seed(seed)
    ids = {name: hf_tok.convert_tokens_to_ids(token)
           for name, token in (("eos", "<|im_end|>"), ("pad", "<|im_end|>"), ("bos", "<|im_start|>"))}
    settings = dict(vocab_size=len(hf_tok), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                    eos_token_id=ids["eos"], pad_token_id=ids["pad"], bos_token_id=ids["bos"],
                    tie_word_embeddings=True, initializer_range=0.2)
    config = config_class(**{**settings, **GENERATOR_SHAPES[shape]})
    model = model_class(config).eval()
    model.save_pretrained(out)
    hf_tok.save_pretrained(out)
    return out


# The encoder conventions users bring, as sentence-transformers records them beside the weights:
# (pooling mode, prompts).
ENCODER_CONVENTIONS = {
    "bge": ("pooling_mode_cls_token", {"query": "Represent this sentence for searching relevant passages: "}),
    "e5": ("pooling_mode_mean_tokens", {"query": "query: ", "passage": "passage: "}),
}


def make_encoder(out: Path, *, seed: int = 0, convention: str | None = None) -> Path:
    """A BERT-style encoder with a WordPiece tokenizer trained on TEXT; with a `convention` of
    ENCODER_CONVENTIONS, the sentence-transformers files that name its pooling and prompts."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, BertTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator([TEXT], trainers.WordPieceTrainer(vocab_size=400, special_tokens=special))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    hf_tok = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                               sep_token="[SEP]", mask_token="[MASK]")
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(hf_tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512)
    BertModel(config).eval().save_pretrained(out)
    hf_tok.save_pretrained(out)
    if convention is not None:
        import json
        mode, prompts = ENCODER_CONVENTIONS[convention]
        (out / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
        (out / "1_Pooling").mkdir()
        modes = ("pooling_mode_cls_token", "pooling_mode_mean_tokens", "pooling_mode_max_tokens")
        (out / "1_Pooling" / "config.json").write_text(json.dumps(
            {"word_embedding_dimension": 32, **{m: m == mode for m in modes}}))
        (out / "config_sentence_transformers.json").write_text(json.dumps({"prompts": prompts}))
    return out
