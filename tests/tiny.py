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


def make_generator(out: Path, *, layers: int = 2, seed: int = 0) -> Path:
    """A llama-style decoder (GQA: 4 heads, 2 KV heads) with a byte-level BPE tokenizer and chat template."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

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

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(hf_tok), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         eos_token_id=hf_tok.convert_tokens_to_ids("<|im_end|>"),
                         pad_token_id=hf_tok.convert_tokens_to_ids("<|im_end|>"),
                         bos_token_id=hf_tok.convert_tokens_to_ids("<|im_start|>"),
                         tie_word_embeddings=True, initializer_range=0.2)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(out)
    hf_tok.save_pretrained(out)
    return out


def make_encoder(out: Path, *, seed: int = 0) -> Path:
    """A BERT-style encoder with a WordPiece tokenizer trained on TEXT."""
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
    return out
