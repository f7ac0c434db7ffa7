"""Decoding on a packed cache: fused attention reading and writing preallocated KV buffers in place.

Fused graphs (GroupQueryAttention, `cache: packed`) take each row's cache as its first
sum(mask) positions and, when a past and its present are bound to the same buffer, write
the new keys and values straight into it. So the cache is allocated once per generation,
as (slots, kv_heads, capacity, head_dim) per layer, and bound through IOBinding: a step
copies nothing but its token ids and mask.

Prompts are prefilled one row at a time into their slots (no padding); single-token steps
run every slot in one pass, each row at its own length (right padding in the mask).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .decode import Decoder
from .manifest import GeneratorSpec

GROW = 256              # capacity is kept a multiple of this many positions


class KVBuffers:
    """Per-layer key/value arrays (slots, kv_heads, capacity, head_dim), grown by doubling."""

    def __init__(self, spec: GeneratorSpec, count: int, slots: int, capacity: int):
        self.shape = (spec.num_kv_heads, spec.head_dim)
        self.dtype = np.dtype(spec.kv_dtype)
        # np.zeros maps untouched pages lazily, so unused capacity costs address space, not RSS.
        self.arrays = [self._alloc(slots, _round_up(capacity)) for _ in range(count)]
        self.bindings: dict[tuple[int, int], object] = {}
        self.logits: tuple[np.ndarray, object] | None = None

    def logits_buffer(self, shape: tuple[int, ...]) -> tuple[np.ndarray, object]:
        """An array of this shape and the OrtValue that shares its memory; the last one is kept,
        since steps ask for the same shape again and again. Logits come in the cache's float
        type (float16 graphs compute in float16 throughout)."""
        if self.logits is None or self.logits[0].shape != shape:
            from onnxruntime import OrtValue
            array = np.empty(shape, dtype=self.dtype)
            self.logits = array, OrtValue.ortvalue_from_numpy(array)
        return self.logits

    @property
    def slots(self) -> int:
        return self.arrays[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.arrays[0].shape[2]

    def _alloc(self, slots: int, capacity: int) -> np.ndarray:
        heads, dim = self.shape
        return np.zeros((slots, heads, capacity, dim), dtype=self.dtype)

    def reserve(self, slots: int, capacity: int, used: int) -> None:
        """Makes room for `slots` rows of `capacity` positions, keeping the first `used` of each."""
        if slots <= self.slots and capacity <= self.capacity:
            return
        slots = max(slots, self.slots)
        capacity = _round_up(max(capacity, 2 * self.capacity if capacity > self.capacity else self.capacity))
        grown = []
        for old in self.arrays:
            new = self._alloc(slots, capacity)
            new[:old.shape[0], :, :used] = old[:, :, :used]
            grown.append(new)
        self.arrays = grown
        self.bindings.clear()       # they point into the old arrays


@dataclass(frozen=True)
class PackedState:
    buffers: KVBuffers
    slots: np.ndarray       # (B,) the buffer slot holding each row
    lengths: np.ndarray     # (B,) positions each row holds


class PackedDecoder(Decoder):
    """Prefill runs row by row whatever `row_by_row` says; it decides whether steps share a pass."""
    layout = "packed"

    def empty_state(self, batch: int, capacity: int = GROW) -> PackedState:
        return PackedState(KVBuffers(self.spec, len(self.past_names), batch, capacity),
                           np.arange(batch), np.zeros(batch, dtype=np.int64))

    def _binding(self, buffers: KVBuffers, start: int, stop: int):
        """An IOBinding of slots [start, stop), each past bound as its own present."""
        key = (start, stop)
        io = buffers.bindings.get(key)
        if io is None:
            from onnxruntime import OrtValue
            io = self.session.io_binding()
            for name, out_name, array in zip(self.past_names, self.output_names[1:], buffers.arrays):
                value = OrtValue.ortvalue_from_numpy(array[start:stop])   # a view: shares memory
                io.bind_ortvalue_input(name, value)
                io.bind_ortvalue_output(out_name, value)
            buffers.bindings[key] = io
        return io

    def _run(self, buffers: KVBuffers, start: int, stop: int, tokens: np.ndarray, mask: np.ndarray,
             num_logits: int) -> np.ndarray:
        io = self._binding(buffers, start, stop)
        io.bind_cpu_input(self.io.input_ids, np.ascontiguousarray(tokens, dtype=np.int64))
        io.bind_cpu_input(self.io.attention_mask, mask)
        io.bind_cpu_input(self.io.num_logits, np.array([num_logits], dtype=np.int64))
        # Logits go to a kept buffer: io.get_outputs() would wrap every bound output,
        # the whole cache included, on each step.
        out = buffers.logits_buffer((stop - start, num_logits, self.spec.vocab_size))
        io.bind_ortvalue_output(self.io.logits, out[1])
        self.session.run_with_iobinding(io)
        return out[0].copy()

    def forward(self, state: PackedState, tokens: np.ndarray, new_mask: np.ndarray,
                num_logits: int = 1) -> tuple[np.ndarray, PackedState]:
        """Runs `tokens` (B, S) after `state`, row by row; every token must be real (mask of ones)."""
        if not new_mask.all():
            raise ValueError("a packed cache holds no padding")
        width = tokens.shape[1]
        buffers = state.buffers
        buffers.reserve(buffers.slots, int(state.lengths.max()) + width, int(state.lengths.max()))
        logits = [self._run(buffers, int(slot), int(slot) + 1, tokens[row:row + 1],
                            np.ones((1, int(state.lengths[row]) + width), dtype=np.int64), num_logits)
                  for row, slot in enumerate(state.slots)]
        return np.concatenate(logits), PackedState(buffers, state.slots, state.lengths + width)

    def prefill(self, prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, PackedState]:
        state = self.empty_state(len(prompts), max(len(p) for p in prompts) + GROW)
        buffers = state.buffers
        logits = []
        for row, prompt in enumerate(prompts):
            done = 0
            if (start := self._prefix_of(prompt)) is not None:
                done = int(start.lengths[0])
                for dst, src in zip(buffers.arrays, start.buffers.arrays):
                    dst[row, :, :done] = src[0, :, :done]
            tokens = np.asarray([prompt[done:]], dtype=np.int64)
            logits.append(self._run(buffers, row, row + 1, tokens,
                                    np.ones((1, len(prompt)), dtype=np.int64), 1)[:, -1])
        return np.concatenate(logits), PackedState(buffers, state.slots,
                                                   np.array([len(p) for p in prompts], dtype=np.int64))

    def step(self, state: PackedState, tokens: np.ndarray) -> tuple[np.ndarray, PackedState]:
        """One token (B,) per row, all rows in one pass over the slots they span."""
        if self.row_by_row and len(state.slots) > 1:
            logits, state = self.forward(state, tokens[:, None], np.ones((len(tokens), 1), dtype=np.int64))
            return logits[:, -1], state
        buffers = state.buffers
        longest = int(state.lengths.max())
        buffers.reserve(buffers.slots, longest + 1, longest)
        start, stop = int(state.slots.min()), int(state.slots.max()) + 1
        # Slots in the span that hold no row of this state get a pad token at position 0.
        ids = np.full((stop - start, 1), self.pad_id, dtype=np.int64)
        lengths = np.zeros(stop - start, dtype=np.int64)
        ids[state.slots - start, 0] = tokens
        lengths[state.slots - start] = state.lengths
        mask = (np.arange(longest + 1)[None, :] <= lengths[:, None]).astype(np.int64)
        logits = self._run(buffers, start, stop, ids, mask, 1)[:, -1]
        return logits[state.slots - start], PackedState(buffers, state.slots, state.lengths + 1)

    def forget(self, state: PackedState, n: int) -> PackedState:
        # Positions past a row's length are never read, and the next pass overwrites them.
        return PackedState(state.buffers, state.slots, state.lengths - n)

    def select(self, state: PackedState, rows: Sequence[int]) -> PackedState:
        """The given rows, moved down into the lowest slots so a step spans no empty ones."""
        rows = list(rows)
        slots, lengths = state.slots[rows].copy(), state.lengths[rows]
        arrays = state.buffers.arrays
        for target in range(len(rows)):
            if target in slots:
                continue
            row = int(slots.argmax())        # the highest slot moves into the lowest hole
            n = int(lengths[row])
            for a in arrays:
                a[target, :, :n] = a[slots[row], :, :n]
            slots[row] = target
        return PackedState(state.buffers, slots, lengths)

    def merge(self, a: PackedState, b: PackedState) -> PackedState:
        """Copies b's rows into free slots of a's buffers."""
        buffers = a.buffers
        taken = set(a.slots.tolist())
        free = [s for s in range(buffers.slots) if s not in taken]
        need = len(b.slots) - len(free)
        longest = int(max(a.lengths.max(), b.lengths.max()))
        buffers.reserve(buffers.slots + max(need, 0), longest + 1, int(a.lengths.max()))
        free += list(range(buffers.slots - max(need, 0), buffers.slots))
        new_slots = np.array(sorted(free)[:len(b.slots)], dtype=np.int64)
        for target, source, n in zip(new_slots, b.slots, b.lengths):
            for dst, src in zip(buffers.arrays, b.buffers.arrays):
                dst[target, :, :n] = src[source, :, :n]
        return PackedState(buffers, np.concatenate([a.slots, new_slots]), np.concatenate([a.lengths, b.lengths]))


def _round_up(n: int) -> int:
    return -(-n // GROW) * GROW
