"""Decoding on a packed cache: fused attention reading and writing preallocated KV buffers in place.

Fused graphs (GroupQueryAttention, `cache: packed`) take each row's cache as its first
`length` positions and, when a past and its present are bound to the same buffer, write
the new keys and values straight into it. So the cache is allocated once per generation,
as (slots, kv_heads, capacity, head_dim) per layer, and bound through IOBinding: a step
copies nothing but its token ids and row lengths.

Prompts are prefilled one row at a time into their slots (no padding); single-token steps
run every slot in one pass, each row at its own length.

On CUDA the buffers live in device memory (`DeviceKVBuffers`): a step binds slot windows by
address, so the cache never crosses the bus; only token ids, lengths and the logits do.

A bundle exported with `--kv-cache int8` adds a step graph whose cache is int8: prompts are
prefilled by the float graph (onnxruntime's int8 cache is slow to prefill), and a row's cache is
quantized into int8 buffers when it starts stepping, where reading a quarter of the bytes makes
a batched step faster.
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ragrt.decoding.decoder import Decoder
from ragrt.bundle.manifest import ASSEMBLE_BIAS, ASSEMBLE_POSITIONS, GeneratorIO, GeneratorSpec
from ragrt.decoding.kvquant import KV_INT8, quantize
from ragrt.decoding.tinygraphs import slot_copy_model

GROW = 256              # capacity is kept a multiple of this many positions


class KVBuffers:
    """Per-layer key/value arrays (slots, kv_heads, capacity, head_dim) in host memory, grown by doubling.
    `scales`: an int8 cache's (decoding/kvquant.py), with which float rows copied in are quantized."""

    def __init__(self, spec: GeneratorSpec, count: int, slots: int, capacity: int, dtype: np.dtype,
                 scales: np.ndarray | None = None):
        self.shape = (spec.num_kv_heads, spec.head_dim)
        self.dtype = np.dtype(dtype)
        self.scales = scales
        self.arrays = [self._alloc(slots, _round_up(capacity)) for _ in range(count)]
        self.bindings: dict[tuple, object] = {}
        self.logits: tuple[np.ndarray, object] | None = None

    def logits_buffer(self, shape: tuple[int, ...]) -> tuple[np.ndarray, object]:
        """An array of this shape and the OrtValue that shares its memory; the last one is kept,
        since steps ask for the same shape again and again. Logits come in the cache's float
        type (float16 graphs compute in float16 throughout), in float32 beside an int8 cache."""
        if self.logits is None or self.logits[0].shape != shape:
            from onnxruntime import OrtValue
            array = np.empty(shape, dtype=self.dtype if self.dtype.kind == "f" else np.float32)
            self.logits = array, OrtValue.ortvalue_from_numpy(array)
        return self.logits

    @property
    def slots(self) -> int:
        return self.arrays[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.arrays[0].shape[2]

    def _alloc(self, slots: int, capacity: int):
        heads, dim = self.shape
        # np.zeros maps untouched pages lazily, so unused capacity costs address space, not RSS.
        return np.zeros((slots, heads, capacity, dim), dtype=self.dtype)

    def bind(self, io, inputs: Sequence[str], outputs: Sequence[str], start: int, stop: int) -> None:
        """Binds slots [start, stop) of each layer as that layer's past and as its present."""
        from onnxruntime import OrtValue
        for name, out_name, array in zip(inputs, outputs, self.arrays):
            value = OrtValue.ortvalue_from_numpy(array[start:stop])   # a view: shares memory
            io.bind_ortvalue_input(name, value)
            io.bind_ortvalue_output(out_name, value)

    def copy_slot(self, target: int, source: "KVBuffers", slot: int, n: int) -> None:
        """The first n positions of `source`'s slot into this buffer's `target` slot (float into int8: quantized)."""
        if source.dtype == self.dtype:
            for dst, src in zip(self.arrays, source.arrays):
                dst[target, :, :n] = src[slot, :, :n]
        elif self.dtype == KV_INT8 and source.dtype.kind == "f":
            for dst, src, scale in zip(self.arrays, source.arrays, self.scales):
                dst[target, :, :n] = quantize(src[slot, :, :n], scale)
        else:
            raise ValueError(f"cannot copy a {source.dtype} cache into a {self.dtype} one")

    def reserve(self, slots: int, capacity: int, used: int) -> None:
        """Makes room for `slots` rows of `capacity` positions, keeping the first `used` of each."""
        if slots <= self.slots and capacity <= self.capacity:
            return
        old = copy.copy(self)          # keeps the old arrays for copy_slot to read
        slots = max(slots, self.slots)
        capacity = _round_up(max(capacity, 2 * self.capacity if capacity > self.capacity else self.capacity))
        self.arrays = [self._alloc(slots, capacity) for _ in self.arrays]
        for slot in range(old.slots):
            self.copy_slot(slot, old, slot, used)
        self.bindings.clear()       # they point into the old arrays


class DeviceKVBuffers(KVBuffers):
    """The same buffers in memory onnxruntime allocates on the session's device.

    Python holds no view into device memory, so steps bind slot windows by address, and
    slots are copied by a small graph (Slice, then Pad to the target capacity) run on the
    same device: growing, prefix reuse and rows joining or leaving stay on the device too.
    """

    def __init__(self, spec: GeneratorSpec, count: int, slots: int, capacity: int, dtype: np.dtype,
                 device: "KVDevice"):
        self.device = device
        super().__init__(spec, count, slots, capacity, dtype)

    def _alloc(self, slots: int, capacity: int):
        from onnxruntime import OrtValue
        heads, dim = self.shape
        shape = (slots, heads, capacity, dim)
        value = OrtValue.ortvalue_from_shape_and_type(shape, self.dtype, self.device.name, self.device.id)
        # Device memory comes uninitialised: zeros keep stale NaNs out of any kernel that
        # reads past a row's length and masks what it read by multiplying.
        value.update_inplace(np.zeros(shape, dtype=self.dtype))
        return value

    @property
    def slots(self) -> int:
        return self.arrays[0].shape()[0]

    @property
    def capacity(self) -> int:
        return self.arrays[0].shape()[2]

    def _window(self, value, start: int, stop: int, capacity: int) -> tuple[tuple[int, ...], int]:
        heads, dim = self.shape
        per_slot = heads * capacity * dim * self.dtype.itemsize
        return (stop - start, heads, capacity, dim), value.data_ptr() + start * per_slot

    def bind(self, io, inputs: Sequence[str], outputs: Sequence[str], start: int, stop: int) -> None:
        for name, out_name, value in zip(inputs, outputs, self.arrays):
            shape, address = self._window(value, start, stop, self.capacity)
            io.bind_input(name, self.device.name, self.device.id, self.dtype, shape, address)
            io.bind_output(out_name, self.device.name, self.device.id, self.dtype, shape, address)

    def copy_slot(self, target: int, source: KVBuffers, slot: int, n: int) -> None:
        # The whole slot is copied, up to the smaller capacity: positions past n are never read.
        kept = min(source.capacity, self.capacity)
        copier = _copier(self.device, self.dtype.name)
        io = copier.io_binding()
        for name, value in (("starts", 0), ("ends", kept), ("axes", 2)):
            io.bind_cpu_input(name, np.array([value], dtype=np.int64))
        io.bind_cpu_input("pads", np.array([0, 0, 0, 0, 0, 0, self.capacity - kept, 0], dtype=np.int64))
        for dst, src in zip(self.arrays, source.arrays):
            shape, address = source._window(src, slot, slot + 1, source.capacity)
            io.bind_input("x", self.device.name, self.device.id, self.dtype, shape, address)
            shape, address = self._window(dst, target, target + 1, self.capacity)
            io.bind_output("y", self.device.name, self.device.id, self.dtype, shape, address)
            copier.run_with_iobinding(io)


@dataclass(frozen=True)
class KVDevice:
    """Where DeviceKVBuffers live: onnxruntime's device name ("cuda", or "cpu" in tests) and id."""
    name: str
    id: int = 0

    @staticmethod
    def of(session) -> "KVDevice | None":
        """The device a session's cache belongs on; None for the CPU, where numpy arrays serve."""
        if session.get_providers()[0] != "CUDAExecutionProvider":
            return None
        options = session.get_provider_options().get("CUDAExecutionProvider", {})
        return KVDevice("cuda", int(options.get("device_id", 0)))


@functools.lru_cache(maxsize=None)
def _copier(device: KVDevice, dtype: str):
    from onnxruntime import InferenceSession
    providers = ([("CUDAExecutionProvider", {"device_id": device.id})] if device.name == "cuda" else []) + ["CPUExecutionProvider"]
    return InferenceSession(slot_copy_model(np.dtype(dtype)), providers=providers)


@dataclass(frozen=True)
class PackedState:
    buffers: KVBuffers
    slots: np.ndarray       # (B,) the buffer slot holding each row
    lengths: np.ndarray     # (B,) positions each row holds


class PackedDecoder(Decoder):
    """Prefill runs row by row whatever `row_by_row` says; it decides whether steps share a pass.
    `step_session`: the step graph (an int8 cache), where the bundle has one; `kv_scales`: an int8
    cache's scales (decoding/kvquant.py), which the graph holds too. States carry their cache's type,
    and each pass runs on the graph of that type. `assemble_session`: the assembly graph
    (`GeneratorSpec.assemble_model`), which `run_placed` runs on the float cache. `int4_step_session`:
    the int4 step graph, which runs the int8 cache's passes of at most `spec.int4_step_rows` rows."""
    layout = "packed"

    def __init__(self, session, spec: GeneratorSpec, kv_scales: np.ndarray | None = None, step_session=None,
                 assemble_session=None, int4_step_session=None):
        super().__init__(session, spec)
        self.assemble_session = assemble_session
        if int4_step_session is not None and step_session is None:
            raise ValueError("an int4 step graph steps on the int8 cache: it needs the step graph too")
        self.int4_step_session = int4_step_session
        self.kv_device = KVDevice.of(session)     # None: host numpy buffers
        self.step_session = session if step_session is None else step_session
        self.step_dtype = self.kv_dtype if step_session is None else KV_INT8    # the cache steps run on
        if (KV_INT8 in (self.kv_dtype, self.step_dtype)) != (kv_scales is not None):
            raise ValueError("an int8 cache needs its kv_scales, and only an int8 cache has them")
        if step_session is not None and self.kv_device is not None:
            raise ValueError("a step graph's cache is quantized in host memory; on a GPU the graph runs alone")
        self.kv_scales = kv_scales

    def empty_state(self, batch: int, capacity: int = GROW, dtype: np.dtype | None = None) -> PackedState:
        """Room for `batch` rows, in the prefilling graph's cache type unless `dtype` says otherwise."""
        count, dtype = len(self.past_names), self.kv_dtype if dtype is None else dtype
        buffers = (KVBuffers(self.spec, count, batch, capacity, dtype, self.kv_scales) if self.kv_device is None
                   else DeviceKVBuffers(self.spec, count, batch, capacity, dtype, self.kv_device))
        return PackedState(buffers, np.arange(batch), np.zeros(batch, dtype=np.int64))

    def stepping(self, state: PackedState) -> PackedState:
        """The state in the step graph's cache type: a prefilled row's float cache quantized, once."""
        if state.buffers.dtype == self.step_dtype:
            return state
        old = state.buffers
        new = self.empty_state(old.slots, old.capacity, self.step_dtype)
        for slot, n in zip(state.slots, state.lengths):
            new.buffers.copy_slot(int(slot), old, int(slot), int(n))
        return PackedState(new.buffers, state.slots, state.lengths)

    def _session(self, buffers: KVBuffers, rows: int):
        if buffers.dtype == self.kv_dtype:
            return self.session
        if self.int4_step_session is not None and rows <= self.spec.int4_step_rows:
            return self.int4_step_session
        return self.step_session

    def _binding(self, buffers: KVBuffers, start: int, stop: int, session):
        """An IOBinding of slots [start, stop) on `session`, each past bound as its own present."""
        key = (start, stop, id(session))
        io = buffers.bindings.get(key)
        if io is None:
            io = session.io_binding()
            buffers.bind(io, self.past_names, self.output_names[1:], start, stop)
            buffers.bindings[key] = io
        return io

    def _run(self, buffers: KVBuffers, start: int, stop: int, tokens: np.ndarray, lengths: np.ndarray,
             num_logits: int) -> np.ndarray:
        """Runs `tokens` in slots [start, stop), which hold `lengths` positions each afterwards."""
        session = self._session(buffers, stop - start)
        io = self._binding(buffers, start, stop, session)
        io.bind_cpu_input(self.io.input_ids, np.ascontiguousarray(tokens, dtype=np.int64))
        for name, value in length_feed(self.io, lengths).items():
            io.bind_cpu_input(name, value)
        io.bind_cpu_input(self.io.num_logits, np.array([num_logits], dtype=np.int64))
        # Logits go to a kept buffer: io.get_outputs() would wrap every bound output,
        # the whole cache included, on each step.
        out = buffers.logits_buffer((stop - start, num_logits, self.spec.vocab_size))
        io.bind_ortvalue_output(self.io.logits, out[1])
        session.run_with_iobinding(io)
        return out[0].copy()

    def run_placed(self, buffers: KVBuffers, row: int, tokens: Sequence[int], positions: np.ndarray,
                   visible: np.ndarray) -> np.ndarray:
        """Runs `tokens` in float slot `row` on the assembly graph: token s at rotary position
        `positions[s]`, attending to the cache positions where `visible[s]` (S x length after the run)
        is true. Their keys and values land after the row's cache, at [length - S, length). Returns the
        last token's logits (1, V)."""
        session = self.assemble_session
        length = visible.shape[1]
        io = self._binding(buffers, row, row + 1, session)
        io.bind_cpu_input(self.io.input_ids, np.asarray([tokens], dtype=np.int64))
        for name, value in length_feed(self.io, np.array([length])).items():
            io.bind_cpu_input(name, value)
        io.bind_cpu_input(self.io.num_logits, np.array([1], dtype=np.int64))
        io.bind_cpu_input(ASSEMBLE_POSITIONS, np.asarray([positions], dtype=np.int64))
        io.bind_cpu_input(ASSEMBLE_BIAS, np.where(visible, np.float32(0), np.float32(-np.inf))[None, None])
        out = buffers.logits_buffer((1, 1, self.spec.vocab_size))
        io.bind_ortvalue_output(self.io.logits, out[1])
        session.run_with_iobinding(io)
        return out[0][:, -1].copy()

    def forward(self, state: PackedState, tokens: np.ndarray, new_mask: np.ndarray,
                num_logits: int = 1) -> tuple[np.ndarray, PackedState]:
        """Runs `tokens` (B, S) after `state`, row by row; every token must be real (mask of ones)."""
        if not new_mask.all():
            raise ValueError("a packed cache holds no padding")
        width = tokens.shape[1]
        buffers = state.buffers
        buffers.reserve(buffers.slots, int(state.lengths.max()) + width, int(state.lengths.max()))
        logits = [self._run(buffers, int(slot), int(slot) + 1, tokens[row:row + 1],
                            state.lengths[row:row + 1] + width, num_logits)
                  for row, slot in enumerate(state.slots)]
        return np.concatenate(logits), PackedState(buffers, state.slots, state.lengths + width)

    def prefill(self, prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, PackedState]:
        state = self.empty_state(len(prompts), max(len(p) for p in prompts) + GROW)
        logits = [self.prefill_row(state.buffers, row, prompt) for row, prompt in enumerate(prompts)]
        return np.concatenate(logits), PackedState(state.buffers, state.slots,
                                                   np.array([len(p) for p in prompts], dtype=np.int64))

    def prefill_row(self, buffers: KVBuffers, row: int, prompt: Sequence[int]) -> np.ndarray:
        """Prefills one prompt into slot `row`, from the cached prefix where it starts with it;
        returns its last-position logits (1, V)."""
        done = 0
        if (start := self._prefix_of(prompt)) is not None:
            done = int(start.lengths[0])
            buffers.copy_slot(row, start.buffers, 0, done)
        tokens = np.asarray([prompt[done:]], dtype=np.int64)
        return self._run(buffers, row, row + 1, tokens, np.array([len(prompt)]), 1)[:, -1]

    def step(self, state: PackedState, tokens: np.ndarray) -> tuple[np.ndarray, PackedState]:
        """One token (B,) per row, all rows in one pass over the slots they span."""
        state = self.stepping(state)
        if self.row_by_row and len(state.slots) > 1:
            logits, state = self.forward(state, tokens[:, None], np.ones((len(tokens), 1), dtype=np.int64))
            return logits[:, -1], state
        buffers = state.buffers
        longest = int(state.lengths.max())
        buffers.reserve(buffers.slots, longest + 1, longest)
        start, stop = int(state.slots.min()), int(state.slots.max()) + 1
        # Slots in the span that hold no row of this state get a pad token at position 0.
        ids = np.full((stop - start, 1), self.pad_id, dtype=np.int64)
        lengths = np.ones(stop - start, dtype=np.int64)
        ids[state.slots - start, 0] = tokens
        lengths[state.slots - start] = state.lengths + 1
        logits = self._run(buffers, start, stop, ids, lengths, 1)[:, -1]
        return logits[state.slots - start], PackedState(buffers, state.slots, state.lengths + 1)

    def forget(self, state: PackedState, n: int) -> PackedState:
        # Positions past a row's length are never read, and the next pass overwrites them.
        return PackedState(state.buffers, state.slots, state.lengths - n)

    def select(self, state: PackedState, rows: Sequence[int]) -> PackedState:
        """The given rows, moved down into the lowest slots so a step spans no empty ones."""
        rows = list(rows)
        slots, lengths = state.slots[rows].copy(), state.lengths[rows]
        for target in range(len(rows)):
            if target in slots:
                continue
            row = int(slots.argmax())        # the highest slot moves into the lowest hole
            state.buffers.copy_slot(target, state.buffers, int(slots[row]), int(lengths[row]))
            slots[row] = target
        return PackedState(state.buffers, slots, lengths)

    def merge(self, a: PackedState, b: PackedState) -> PackedState:
        """Copies b's rows into free slots of a's buffers (in the step graph's cache type)."""
        a = self.stepping(a)
        buffers = a.buffers
        taken = set(a.slots.tolist())
        free = [s for s in range(buffers.slots) if s not in taken]
        need = len(b.slots) - len(free)
        longest = int(max(a.lengths.max(), b.lengths.max()))
        buffers.reserve(buffers.slots + max(need, 0), longest + 1, int(a.lengths.max()))
        free += list(range(buffers.slots - max(need, 0), buffers.slots))
        new_slots = np.array(sorted(free)[:len(b.slots)], dtype=np.int64)
        for target, source, n in zip(new_slots, b.slots, b.lengths):
            buffers.copy_slot(int(target), b.buffers, int(source), int(n))
        return PackedState(buffers, np.concatenate([a.slots, new_slots]), np.concatenate([a.lengths, b.lengths]))


def length_feed(io: GeneratorIO, lengths: np.ndarray) -> dict[str, np.ndarray]:
    """The inputs telling a packed graph that each row holds its first `lengths[b]` positions once
    this pass has run: the lengths themselves (schema 3 graphs), or a mask of ones."""
    if io.seqlens_k:
        return {io.seqlens_k: (lengths - 1).astype(np.int32),
                io.total_sequence_length: np.array(lengths.max(), dtype=np.int32)}
    return {io.attention_mask: (np.arange(lengths.max())[None, :] < lengths[:, None]).astype(np.int64)}


def _round_up(n: int) -> int:
    return -(-n // GROW) * GROW
