"""KV-cached decoding, written directly against one onnxruntime decoder graph.

The graph (see `GeneratorIO`) takes input_ids, attention_mask, position_ids, num_logits
and the past keys/values of every layer, and returns logits for the last `num_logits`
positions plus the new keys/values. Zero-length past tensors make the same graph serve
prefill and every step. Batches are left-padded, so the newest token of every row sits in
the last column and one `num_logits=1` call serves them all.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ragrt.bundle.manifest import GeneratorSpec


@dataclass(frozen=True)
class KVState:
    past: tuple[np.ndarray, ...]   # k0, v0, k1, v1, ...: each (B, kv_heads, T, head_dim)
    mask: np.ndarray               # (B, T) int64, 0 on left padding
    positions: np.ndarray          # (B,) int64, position id of each row's next token


COMPACT_AFTER = 64          # masked-out cache positions tolerated before compacting


class Decoder:
    """The model layer: forward passes over one decoder graph and the KV state they leave.

    The verbs are prefill, step, forward (several tokens, for drafts), select and merge (rows
    leaving and joining a batch), forget (rewinding) and continuation_logprob. The loops that
    choose tokens drive it through `ragrt.decoding.generator.Generator`.
    """
    layout = "masked"               # the GeneratorSpec.cache this class drives

    def __init__(self, session, spec: GeneratorSpec):
        if spec.cache != self.layout:
            raise ValueError(f"{type(self).__name__} drives '{self.layout}' caches, not '{spec.cache}'")
        io = spec.io
        self.session = session
        self.spec = spec
        self.io = io
        self.past_names = [name.format(layer=i) for i in range(spec.num_layers)
                           for name in (io.past_key, io.past_value)]
        self.output_names = [io.logits] + [name.format(layer=i) for i in range(spec.num_layers)
                                           for name in (io.present_key, io.present_value)]
        self.kv_dtype = np.dtype(spec.kv_dtype)
        self.pad_id = spec.pad_token_id
        self.prefix: tuple[tuple[int, ...], object] | None = None     # ids and their state
        # int8 graphs quantize activations in ways that depend on the batch shape, so a row's
        # numbers change with its neighbours: their batches run row by row.
        self.row_by_row = not spec.batch_invariant

    def empty_state(self, batch: int) -> KVState:
        shape = (batch, self.spec.num_kv_heads, 0, self.spec.head_dim)
        empty = np.zeros(shape, dtype=self.kv_dtype)
        return KVState(tuple(empty for _ in self.past_names),
                       np.zeros((batch, 0), dtype=np.int64), np.zeros(batch, dtype=np.int64))

    def forward(self, state: KVState, tokens: np.ndarray, new_mask: np.ndarray,
                num_logits: int = 1) -> tuple[np.ndarray, KVState]:
        """Runs `tokens` (B, S) after `state`; returns logits (B, num_logits, V) and the new state."""
        mask = np.concatenate([state.mask, new_mask], axis=1)
        # Padding positions get position 0; real tokens continue each row's own count.
        positions = state.positions[:, None] + np.cumsum(new_mask, axis=1) - 1
        positions = np.maximum(positions, 0) * new_mask
        feed = {
            self.io.input_ids: tokens.astype(np.int64, copy=False),
            self.io.attention_mask: mask,
            self.io.num_logits: np.array([num_logits], dtype=np.int64),
        }
        if self.io.position_ids:
            feed[self.io.position_ids] = positions.astype(np.int64)
        feed.update(zip(self.past_names, state.past))
        logits, *present = self.session.run(self.output_names, feed)
        return logits, KVState(tuple(present), mask, state.positions + new_mask.sum(axis=1))

    def cache_prefix(self, ids: Sequence[int]) -> None:
        """Keeps the keys and values of `ids`, the start that prompts share (the fixed instruction),
        so prefilling a prompt that starts with them computes only the rest.

        Only where the export measured it exact (`prefix_exact`): a pass over the rest after the
        cached start must give the numbers one pass over the whole prompt would.
        """
        self.prefix = None
        if len(ids) > 1 and self.spec.prefix_exact:
            _, state = self.prefill([ids])
            self.prefix = (tuple(ids), state)

    def _prefix_of(self, prompt: Sequence[int]):
        """The cached prefix state if `prompt` starts with the cached ids and goes beyond them."""
        if self.prefix is None:
            return None
        ids, state = self.prefix
        return state if len(prompt) > len(ids) and tuple(prompt[:len(ids)]) == ids else None

    def prefill(self, prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, KVState]:
        """Left-pads the prompts into one batch; returns last-position logits (B, V) and the state."""
        if len(prompts) == 1 and (start := self._prefix_of(prompts[0])) is not None:
            rest = np.asarray([prompts[0][start.positions[0]:]], dtype=np.int64)
            logits, state = self.forward(start, rest, np.ones_like(rest))
            return logits[:, -1], state
        width = max(len(p) for p in prompts)
        tokens = np.full((len(prompts), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(prompts), width), dtype=np.int64)
        for row, p in enumerate(prompts):
            tokens[row, width - len(p):] = p
            mask[row, width - len(p):] = 1
        logits, state = self.forward(self.empty_state(len(prompts)), tokens, mask)
        return logits[:, -1], state

    def step(self, state: KVState, tokens: np.ndarray) -> tuple[np.ndarray, KVState]:
        """Appends one token (B,) to every row; returns next-token logits (B, V)."""
        logits, state = self.forward(state, tokens[:, None], np.ones((len(tokens), 1), dtype=np.int64))
        return logits[:, -1], state

    def continuation_logprob(self, state: KVState, last_logits: np.ndarray,
                             continuation: Sequence[int]) -> np.ndarray:
        """log p(continuation | each row's prefix), float64 (B,), reusing the prefix state.

        `last_logits` (B, V) are the logits that followed the prefix; the continuation's
        first token is scored with them, the rest with one forced forward pass.
        """
        cont = np.asarray(continuation, dtype=np.int64)
        batch = len(last_logits)
        total = log_softmax(last_logits)[:, cont[0]]
        if len(cont) > 1:
            tokens = np.broadcast_to(cont[:-1], (batch, len(cont) - 1))
            logits, _ = self.forward(state, np.ascontiguousarray(tokens),
                                     np.ones(tokens.shape, dtype=np.int64), num_logits=len(cont) - 1)
            logp = log_softmax(logits)                                 # (B, L-1, V)
            total = total + np.take_along_axis(logp, cont[None, 1:, None], axis=2)[..., 0].sum(axis=1)
        return total

    def forget(self, state: KVState, n: int) -> KVState:
        """Drops the last n positions of a one-row state: rejected drafts.

        Their keys and values stay in the cache, masked out like padding (copying the cache to
        cut them would cost as much as a step); once the dead positions reach COMPACT_AFTER,
        the cache is rewritten without them.
        """
        if n == 0:
            return state
        mask = state.mask.copy()
        mask[:, mask.shape[1] - n:] = 0
        if (mask == 0).sum() >= COMPACT_AFTER:
            keep = np.flatnonzero(mask[0])
            return KVState(tuple(np.ascontiguousarray(p[:, :, keep]) for p in state.past), mask[:, keep],
                           state.positions - n)
        return KVState(state.past, mask, state.positions - n)

    def merge(self, a: KVState, b: KVState) -> KVState:
        """Stacks two batches; the shorter one is left-padded (masked) so every row still ends in the last column."""
        width = max(a.mask.shape[1], b.mask.shape[1])

        def pad(s: KVState) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
            extra = width - s.mask.shape[1]
            return (tuple(np.pad(p, ((0, 0), (0, 0), (extra, 0), (0, 0))) for p in s.past),
                    np.pad(s.mask, ((0, 0), (extra, 0))))

        (past_a, mask_a), (past_b, mask_b) = pad(a), pad(b)
        return KVState(tuple(np.concatenate([x, y]) for x, y in zip(past_a, past_b)),
                       np.concatenate([mask_a, mask_b]), np.concatenate([a.positions, b.positions]))

    def select(self, state: KVState, rows: Sequence[int]) -> KVState:
        """The given rows, without the leading columns that only departed rows used."""
        mask = state.mask[rows]
        first = int(mask.any(axis=0).argmax())
        return KVState(tuple(p[rows, :, first:] for p in state.past), mask[:, first:], state.positions[rows])


class RowByRowDecoder:
    """A masked graph whose rows are not independent in a batch (int8 activations quantized per
    batch shape): each row keeps its own one-row KVState and every pass runs row by row, so a
    row's numbers never depend on its neighbours. Its state is a tuple of those KVStates."""

    def __init__(self, rows: Decoder):
        self.rows = rows

    def __getattr__(self, name: str):
        return getattr(self.rows, name)      # spec, session, io, prefix, cache_prefix, ...

    def empty_state(self, batch: int) -> tuple[KVState, ...]:
        return tuple(self.rows.empty_state(1) for _ in range(batch))

    def prefill(self, prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, tuple[KVState, ...]]:
        logits, states = zip(*(self.rows.prefill([p]) for p in prompts))
        return np.concatenate(logits), tuple(states)

    def step(self, state: tuple[KVState, ...], tokens: np.ndarray) -> tuple[np.ndarray, tuple[KVState, ...]]:
        logits, states = zip(*(self.rows.step(s, tokens[i:i + 1]) for i, s in enumerate(state)))
        return np.concatenate(logits), tuple(states)

    def forward(self, state: tuple[KVState, ...], tokens: np.ndarray, new_mask: np.ndarray,
                num_logits: int = 1) -> tuple[np.ndarray, tuple[KVState, ...]]:
        logits, states = zip(*(self.rows.forward(s, tokens[i:i + 1], new_mask[i:i + 1], num_logits)
                               for i, s in enumerate(state)))
        return np.concatenate(logits), tuple(states)

    def continuation_logprob(self, state: tuple[KVState, ...], last_logits: np.ndarray,
                             continuation: Sequence[int]) -> np.ndarray:
        return np.concatenate([self.rows.continuation_logprob(s, last_logits[i:i + 1], continuation)
                               for i, s in enumerate(state)])

    def forget(self, state: tuple[KVState, ...], n: int) -> tuple[KVState, ...]:
        return tuple(self.rows.forget(s, n) for s in state)

    def merge(self, a: tuple[KVState, ...], b: tuple[KVState, ...]) -> tuple[KVState, ...]:
        return a + b

    def select(self, state: tuple[KVState, ...], rows: Sequence[int]) -> tuple[KVState, ...]:
        return tuple(state[i] for i in rows)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Along the last axis, in float64: the RAG mixtures add probabilities across passages."""
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
