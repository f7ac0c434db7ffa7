"""Retriever fine-tuning pieces: mean-pooled embeddings, hard-negative mining, the contrastive loss."""
from __future__ import annotations

from typing import Sequence

import random

import numpy as np

# Cosine similarities live in [-1, 1]; a scale of 20 (temperature 0.05) makes the softmax
# over them sharp enough to learn from, as sentence-transformers' MultipleNegativesRankingLoss does.
SCALE = 20.0


def embed(model, tokenizer, texts: Sequence[str], *, max_length: int = 256, grad: bool = False):
    """Mean-pooled, L2-normalised embeddings (n, dim), the same pooling the exported graph has."""
    import torch
    batch = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.set_grad_enabled(grad):
        h = model(**batch).last_hidden_state.float()       # fp32 whatever the autocast (precision.py)
        mask = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
        pooled = (h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)


def contrastive_loss(queries, positives, negatives=None):
    """InfoNCE with in-batch negatives: query i must score its own positive above every other
    positive in the batch and every mined hard negative. Shapes (B, d), (B, d), (N, d)."""
    import torch
    candidates = positives if negatives is None or len(negatives) == 0 else torch.cat([positives, negatives])
    scores = SCALE * queries @ candidates.T                        # (B, B + N)
    return torch.nn.functional.cross_entropy(scores, torch.arange(len(queries)))


def mine_hard_negatives(query_vecs: np.ndarray, pool_vecs: np.ndarray, positives: list[set[int]],
                        per_query: int) -> list[list[int]]:
    """For each query, the highest-scoring pool rows that are not its positives."""
    scores = query_vecs @ pool_vecs.T
    out = []
    for row, pos in enumerate(positives):
        ranked = np.argsort(-scores[row], kind="stable")
        out.append([int(j) for j in ranked if int(j) not in pos][:per_query])
    return out


def bm25_negatives(questions: list[str], texts: list[str], positives: list[set[int]], per_query: int) -> list[list[int]]:
    """For each question, the rows of `texts` BM25 ranks highest that are not its positives: the
    lexical near misses a dense encoder does not mine (hybrid retrieval ranks with both)."""
    from ragrt.retrieval.bm25 import Bm25Index
    index = Bm25Index.build(texts)
    return [[j for j in index.search(q, per_query + len(pos)) if j not in pos][:per_query]
            for q, pos in zip(questions, positives)]


def sample_pool(size: int, n_passages: int, positives: list[set[int]], seed: int) -> list[int]:
    """Every positive passage plus a seeded sample of the rest: embedding the whole corpus
    each epoch would cost minutes, and hard negatives come from the top of the ranking anyway."""
    pos_rows = sorted({r for rows in positives for r in rows})
    taken = set(pos_rows)
    others = [i for i in range(n_passages) if i not in taken]
    return pos_rows + random.Random(seed).sample(others, min(len(others), max(size - len(pos_rows), 0)))
