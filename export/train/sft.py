"""Generator fine-tuning pieces: examples on the engine's own prompt, the answer-only loss mask,
the block-attention mask, and the RAG marginal likelihood for joint training."""
from __future__ import annotations

from typing import Sequence

from ragrt.decoding.prompt import PromptBuilder
from ragrt.retrieval.passages import Passage

IGNORE = -100                  # label value that PyTorch's cross-entropy skips
PREFIX = -1                    # segment of the fixed prefix: every token sees it
SEES_ALL = -2                  # segment of the tail and the answer: causal attention over everything


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
                  eos_id: int, max_answer_tokens: int) -> tuple[list[int], list[int], list[int]]:
    """(input_ids, labels, segments) on the prompt in block layout, as the engine assembles it
    from passage KV: segments are PREFIX, the block's index (0-based), or SEES_ALL (tail, answer)."""
    prompt, _ = builder.build_blocks(question, passages)
    answer_ids = _answer_ids(builder, answer, eos_id, max_answer_tokens)
    segments = [PREFIX] * len(prompt.prefix) + [i for i, b in enumerate(prompt.blocks) for _ in b]
    segments += [SEES_ALL] * (len(prompt.tail) + len(answer_ids))
    return prompt.ids + answer_ids, [IGNORE] * len(prompt.ids) + answer_ids, segments


def block_mask(segments: Sequence[int]):
    """(T, T) bool, True where token t attends to s: causal, and s in the prefix, or in t's own
    block, or t in the tail or answer. A block never sees an earlier one, as when its KV is
    computed with the prefix alone as past. Positions stay 0..T-1, as the engine turns keys."""
    import torch
    seg = torch.tensor(segments)
    query, key = seg[:, None], seg[None, :]
    causal = torch.ones(len(segments), len(segments), dtype=torch.bool).tril()
    return causal & ((key == PREFIX) | (key == query) | (query == SEES_ALL))


def additive_mask(allowed, dtype):
    """(1, 1, T, T) float: 0 where attended, the dtype's lowest value elsewhere. HF takes a 4-D
    mask as it is and adds it to the scores (sdpa and eager attention; flash-attention drops it)."""
    import torch
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


def sequence_logprobs(model, examples: Sequence[tuple[list[int], list[int]]], pad_id: int):
    """log p(labelled tokens | the rest), summed per example: a (n,) tensor with gradients."""
    import torch
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (x, y) in enumerate(examples):
        ids[row, :len(x)] = torch.tensor(x)
        labels[row, :len(y)] = torch.tensor(y)
        mask[row, :len(x)] = 1
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()   # predicts tokens 1..T-1
    target = labels[:, 1:]
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
