"""Generator fine-tuning pieces: examples on the engine's own prompt, the answer-only loss mask,
prompts read from passage KV as the engine reads them, and the RAG marginal likelihood for joint training."""
from __future__ import annotations

from typing import Sequence

from ragrt.decoding.blocks import BlockPrompt
from ragrt.decoding.prompt import PromptBuilder
from ragrt.retrieval.passages import Passage

IGNORE = -100                  # label value that PyTorch's cross-entropy skips


def _answer_ids(builder: PromptBuilder, answer: str, eos_id: int, max_answer_tokens: int) -> list[int]:
    return builder.tokenizer.encode(" ".join(answer.split()), add_special_tokens=False).ids[:max_answer_tokens] + [eos_id]


def sft_example(builder: PromptBuilder, question: str, passages: Sequence[Passage], answer: str,
                eos_id: int, max_answer_tokens: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels): the prompt exactly as the engine builds it, then the answer and EOS.
    Only answer tokens carry loss: the model should learn to answer, not to predict passages."""
    prompt = builder.build(question, passages).ids
    answer_ids = _answer_ids(builder, answer, eos_id, max_answer_tokens)
    return prompt + answer_ids, [IGNORE] * len(prompt) + answer_ids


def block_example(builder: PromptBuilder, question: str, passages: Sequence[Passage], answer: str,
                  eos_id: int, max_answer_tokens: int) -> tuple[BlockPrompt, list[int]]:
    """(prompt, answer ids and EOS): the prompt in block layout, as the engine assembles it from passage KV."""
    prompt, _ = builder.build_blocks(question, passages)
    return prompt, _answer_ids(builder, answer, eos_id, max_answer_tokens)


def block_logits(model, prompt: BlockPrompt, continuation: Sequence[int], repair: int = 0):
    """Logits (len(tail) + len(continuation), V) over the tail and `continuation`, the prompt read
    as the engine reads it from passage KV (decoding/blocks.py): each block run after the prefix
    alone, at positions starting right after it, its keys turned by the model's own rotary to
    their place in the prompt, then the tail run over the assembled cache at contiguous positions.
    Differentiable, so training sees the very states inference assembles: a block mask at
    contiguous positions would compute a block's deeper states at its place in the prompt, where
    the engine computes them once, right after the prefix. `repair`: the engine's
    `rag.passage_kv_repair`, the first tokens of each later block run again over the cache before it."""
    import torch
    from transformers import DynamicCache
    base = model.get_base_model() if hasattr(model, "get_base_model") else model     # a LoRA model's own
    n = len(prompt.prefix)
    prefix = model(torch.tensor([prompt.prefix]), use_cache=True).past_key_values
    layers = range(len(prefix.layers))
    keys = [[prefix.layers[i].keys] for i in layers]
    values = [[prefix.layers[i].values] for i in layers]

    def cache(parts_k, parts_v):
        c = DynamicCache()
        for i in layers:
            c.update(torch.cat(parts_k[i], dim=2), torch.cat(parts_v[i], dim=2), i)
        return c

    offset = n
    for block in prompt.blocks:
        past = cache([k[:1] for k in keys], [v[:1] for v in values])
        out = model(torch.tensor([block]), past_key_values=past, position_ids=torch.arange(n, n + len(block))[None],
                    use_cache=True).past_key_values
        for i in layers:
            k, v = out.layers[i].keys[:, :, n:], out.layers[i].values[:, :, n:]
            keys[i].append(turn_keys(base, i, k, offset - n))
            values[i].append(v)
        if repair and offset > n:
            r = min(repair, len(block))
            again = model(torch.tensor([block[:r]]), past_key_values=cache([k[:-1] for k in keys], [v[:-1] for v in values]),
                          position_ids=torch.arange(offset, offset + r)[None], use_cache=True).past_key_values
            for i in layers:
                keys[i][-1] = torch.cat([again.layers[i].keys[:, :, offset:], keys[i][-1][:, :, r:]], dim=2)
                values[i][-1] = torch.cat([again.layers[i].values[:, :, offset:], values[i][-1][:, :, r:]], dim=2)
        offset += len(block)
    seq = [*prompt.tail, *continuation]
    return model(torch.tensor([seq]), past_key_values=cache(keys, values),
                 position_ids=torch.arange(offset, offset + len(seq))[None]).logits[0]


def turn_keys(model, layer: int, keys, delta: int):
    """`layer`'s keys (1, kv_heads, L, head_dim), after rotary, turned by `delta` more positions with
    the model's own rotary for that layer: Gemma 3's local one on its sliding-window layers, and on
    the first dims only where rotary is partial (Phi-3's partial_rotary_factor)."""
    import torch
    from transformers.models.llama.modeling_llama import rotate_half
    inner = model.model
    local = getattr(model.config, "layer_types", None) and model.config.layer_types[layer] == "sliding_attention"
    rotary = inner.rotary_emb_local if local and hasattr(inner, "rotary_emb_local") else inner.rotary_emb
    cos, sin = rotary(keys, torch.tensor([[delta]]))
    d = cos.shape[-1]
    return torch.cat([keys[..., :d] * cos + rotate_half(keys[..., :d]) * sin, keys[..., d:]], dim=-1)


def block_loss(model, prompt: BlockPrompt, answer_ids: Sequence[int], repair: int = 0):
    """Mean cross-entropy of the answer after a prompt read from passage KV (`block_logits`)."""
    import torch
    logits = block_logits(model, prompt, answer_ids[:-1], repair)[len(prompt.tail) - 1:]    # row j predicts answer j
    if logits.dtype == torch.bfloat16:          # under autocast (precision.py): the softmax in fp32
        logits = logits.float()
    return torch.nn.functional.cross_entropy(logits, torch.tensor(answer_ids))


def _first_label(labels: Sequence[int]) -> int:
    return next(i for i, t in enumerate(labels) if t != IGNORE)


def answer_loss(model, ids: Sequence[int], labels: Sequence[int]):
    """Mean cross-entropy of an `sft_example`'s answer, as the model's own loss with `labels` gives it,
    with logits only where they predict the answer (`logits_to_keep`): over the whole prompt they were
    most of a step's compute and memory, with Gemma 3's 262k-token vocabulary above all."""
    import torch
    first = _first_label(labels)
    logits = model(input_ids=torch.tensor([ids]), logits_to_keep=len(ids) - first + 1).logits[0, :-1].float()
    return torch.nn.functional.cross_entropy(logits, torch.tensor(labels[first:]), ignore_index=IGNORE)


def sequence_logprobs(model, examples: Sequence[tuple[list[int], list[int]]], pad_id: int, past=None):
    """log p(labelled tokens | the rest), summed per example: a (n,) tensor with gradients.
    `past`: a cache every example continues (one row each), its tokens before theirs. Logits are
    computed from the first labelled token's place on (`answer_loss` says why)."""
    import torch
    width = max(len(ids) for ids, _ in examples)
    first = min(_first_label(y) for _, y in examples)
    start = past.get_seq_length() if past is not None else 0
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), start + width), dtype=torch.long)
    mask[:, :start] = 1
    for row, (x, y) in enumerate(examples):
        ids[row, :len(x)] = torch.tensor(x)
        labels[row, :len(y)] = torch.tensor(y)
        mask[row, start:start + len(x)] = 1
    positions = torch.arange(start, start + width).expand(len(examples), -1)
    logits = model(input_ids=ids, attention_mask=mask, past_key_values=past, position_ids=positions,
                   logits_to_keep=width - first + 1).logits[:, :-1].float()   # predicts tokens first..T-1
    target = labels[:, first:]
    logp = torch.log_softmax(logits, dim=-1)
    picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * (target != IGNORE)).sum(dim=1)


def rag_marginal_nll(query_vec, passage_vecs, answer_logprobs, temperature: float):
    """-log sum_c P(c|q) P(a|q,c), with P(c|q) = softmax(q . d_c / temperature).

    Passage vectors are frozen (the index is not rebuilt); the query encoder learns from the
    generator through P(c|q), and the generator from the passages it is given."""
    import torch
    log_prior = torch.log_softmax(query_vec @ passage_vecs.T / temperature, dim=-1)   # (k,)
    return -torch.logsumexp(log_prior + answer_logprobs, dim=-1)
