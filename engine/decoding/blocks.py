"""Passage KV: each passage's keys and values computed once, reused by every question that retrieves it.

A prompt in block layout is the fixed prefix (system prompt and chat markup up to the
context), one block per passage, each rendered and tokenized on its own, and the tail (the
question and the template's end). A block's keys and values are computed by the bundle's
own graph with the prefix as its past, so its positions start right after the prefix
(Block-Attention, arXiv 2409.15355; TurboRAG, arXiv 2410.07590). At question time the
prefix and the blocks are copied into the packed cache in rank order; each block's keys,
stored after rotary, are turned by R(offset) so the positions run on contiguously
(R(a)R(b) = R(a+b), as in CacheBlend), and only the tail is prefilled.

A block attends to the prefix and itself, never to the passages ranked before it: that is
what makes it reusable, and why generators trained with `ragrt finetune --block-attention`
read such prompts best.
"""
from __future__ import annotations

import functools
import hashlib
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ragrt.bundle.manifest import GeneratorSpec, PromptSpec
from ragrt.options import PASSAGE_KV_CACHE_MB
from ragrt.decoding.kvquant import KV_INT8, dequantize, quantize
from ragrt.decoding.packed import GROW, KVBuffers, PackedDecoder, PackedState
from ragrt.decoding.tinygraphs import cast_model


@dataclass(frozen=True)
class BlockPrompt:
    prefix: tuple[int, ...]
    blocks: tuple[tuple[int, ...], ...]    # one per passage, in rank order
    tail: tuple[int, ...]

    @property
    def ids(self) -> list[int]:
        """The whole prompt, as full prefill would read it."""
        return [*self.prefix, *(t for b in self.blocks for t in b), *self.tail]


@dataclass
class BlockStats:
    """What one request's prefill did: blocks found in a cache or computed, and the assembly time."""
    reused: int = 0
    computed: int = 0
    assemble_ms: float = 0.0
    repair_ms: float = 0.0


def inv_freq(spec: GeneratorSpec, layer: int) -> np.ndarray:
    """The rotary frequencies of `layer`'s keys, float64: its base's, or the scaled ones recorded."""
    dim = spec.rotary_dim or spec.head_dim
    if layer in spec.local_rotary_layers:
        return spec.rotary_local_base ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
    if spec.rotary_inv_freq:
        return np.asarray(spec.rotary_inv_freq, dtype=np.float64)
    return spec.rotary_base ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)


def rotate_keys(keys: np.ndarray, delta: int, spec: GeneratorSpec, layer: int = 0) -> np.ndarray:
    """`layer`'s keys (..., L, head_dim) rotated after rotary by `delta` more positions: R(delta)·k.
    Dims past `rotary_dim` (partial rotary) are not rotated.

    Angles come from the layer's frequencies in float64, the graph's own table to within rounding
    (the export checks them against it)."""
    if delta == 0:
        return keys
    dim = spec.rotary_dim or spec.head_dim
    angles = delta * inv_freq(spec, layer)
    cos, sin = np.cos(angles).astype(keys.dtype), np.sin(angles).astype(keys.dtype)
    out = keys.copy()
    if spec.rotary_interleaved:
        x1, x2 = keys[..., 0:dim:2], keys[..., 1:dim:2]
        out[..., 0:dim:2] = x1 * cos - x2 * sin
        out[..., 1:dim:2] = x2 * cos + x1 * sin
    else:
        half = dim // 2
        x1, x2 = keys[..., :half], keys[..., half:dim]
        out[..., :half] = x1 * cos - x2 * sin
        out[..., half:dim] = x2 * cos + x1 * sin
    return out


# Blocks are kept in float16, in memory and in the `--passage-kv all` store: half the bytes of the
# float32 cache, and a block found (in either place) is the very block a miss would compute. An
# int8 cache's blocks are kept as the graph wrote them, in int8.
BLOCK_DTYPE = np.dtype(np.float16)


def block_dtype(kv_dtype: str | np.dtype) -> np.dtype:
    """How blocks of a cache of this type are kept."""
    return KV_INT8 if np.dtype(kv_dtype) == KV_INT8 else BLOCK_DTYPE


def widen(kv: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """A kept block in the cache's float type: float16 to float32 by onnxruntime's cast, which is
    several times faster than numpy's and is most of what assembling a prompt costs."""
    if kv.dtype == dtype:
        return kv
    if kv.dtype == BLOCK_DTYPE and dtype == np.float32:
        return _cast_session().run(None, {"x": kv})[0]
    return kv.astype(dtype)


@functools.lru_cache(maxsize=None)
def _cast_session():
    from onnxruntime import InferenceSession, SessionOptions
    options = SessionOptions()
    options.intra_op_num_threads = 1        # a few megabytes: threads would cost more than they save
    return InferenceSession(cast_model(), options, providers=["CPUExecutionProvider"])


class BlockCache:
    """Computed blocks by content key, least recently used first out, within a byte budget.

    A dict of numpy arrays under a lock: nothing more is needed, and no caching library
    budgets by the bytes of its values."""

    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self.bytes = 0
        self._items: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0

    def get(self, key: bytes) -> np.ndarray | None:
        with self._lock:
            kv = self._items.get(key)
            if kv is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return kv

    def put(self, key: bytes, kv: np.ndarray) -> None:
        if kv.nbytes > self.budget:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = kv
            self.bytes += kv.nbytes
            while self.bytes > self.budget:
                _, old = self._items.popitem(last=False)
                self.bytes -= old.nbytes
                self.evictions += 1

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: bytes) -> bool:
        """Held now; unlike `get`, neither counts a hit nor moves the block up the queue."""
        with self._lock:
            return key in self._items


class PassageKV:
    """Prefills block prompts from reused passage KV: the packed decoder's `prefill` for them.

    `graph_id` names the generator graph (its checksum): with the prefix it salts every key,
    so a re-export or another prompt template never meets KV computed for something else.
    Prompts that are plain token lists are prefilled whole, so one batch may mix the two.
    Safe to share between threads, as the engine is.
    """

    def __init__(self, decoder: PackedDecoder, graph_id: str, cache: BlockCache | None = None, store=None,
                 dtype: np.dtype | None = None, repair: int = 0):
        if not decoder.spec.rotary_base:
            raise ValueError("this generator's rotary positions are unknown (re-export the bundle)")
        self.decoder = decoder
        self.graph_id = graph_id
        self.cache = cache if cache is not None else BlockCache(PASSAGE_KV_CACHE_MB << 20)
        self.store = store                 # precomputed blocks (`--passage-kv all`): .get(key) -> array | None, `in`
        self.dtype = block_dtype(decoder.kv_dtype) if dtype is None else np.dtype(dtype)   # of the blocks kept
        self.repair = repair               # tokens recomputed at the start of each block after the first
        self._prefixes: dict[tuple[int, ...], tuple[list[np.ndarray], bytes]] = {}
        self._lock = threading.Lock()

    def _prefix(self, prefix: tuple[int, ...]) -> tuple[list[np.ndarray], bytes]:
        """The prefix's keys and values, one array per past, and the salt of its blocks' keys."""
        with self._lock:
            if prefix not in self._prefixes:
                state = self.decoder.empty_state(1, len(prefix) + 1)
                self.decoder.prefill_row(state.buffers, 0, prefix)
                salt = hashlib.blake2b(digest_size=16)
                salt.update(self.graph_id.encode())
                salt.update(np.asarray(prefix, dtype=np.int64).tobytes())
                self._prefixes[prefix] = [a[0, :, :len(prefix)].copy() for a in state.buffers.arrays], salt.digest()
            return self._prefixes[prefix]

    def key(self, prefix: Sequence[int], block: Sequence[int]) -> bytes:
        h = hashlib.blake2b(self._prefix(tuple(prefix))[1], digest_size=16)
        h.update(np.asarray(block, dtype=np.int64).tobytes())
        return h.digest()

    def block(self, prefix: tuple[int, ...], ids: Sequence[int], stats: BlockStats) -> np.ndarray:
        """(layers x {key, value}, kv_heads, len(ids), head_dim): found, or computed and kept."""
        key = self.key(prefix, ids)
        kv = self.cache.get(key)
        if kv is None and self.store is not None:
            kv = self.store.get(key)
        if kv is not None:
            stats.reused += 1
            return kv
        kv = self.compute(prefix, ids).astype(self.dtype)
        self.cache.put(key, kv)
        stats.computed += 1
        return kv

    def prefill_cost(self, prompt: BlockPrompt) -> int:
        """Tokens the graph will run to prefill `prompt` if nothing changes before then: the tail, the
        repairs and the blocks not yet computed. What a scheduler should budget, where the prompt's
        length counts blocks that are only copied."""
        with self._lock:
            if prompt.prefix not in self._prefixes:     # the first prompt of its kind: nothing is computed
                return len(prompt.ids)
        cost = len(prompt.tail) + self._repaired(prompt)
        for ids in prompt.blocks:
            key = self.key(prompt.prefix, ids)
            if key not in self.cache and (self.store is None or key not in self.store):
                cost += len(ids)
        return cost

    def _repaired(self, prompt: BlockPrompt) -> int:
        """Tokens the repair runs again: the first `repair` of each block after the first."""
        return sum(min(self.repair, len(b)) for b in prompt.blocks[1:])

    def compute(self, prefix: tuple[int, ...], ids: Sequence[int]) -> np.ndarray:
        """One block's keys and values, run by the graph after the prefix."""
        n, p = len(ids), len(prefix)
        state = self.decoder.empty_state(1, p + n + 1)
        arrays = state.buffers.arrays
        for a, kv in zip(arrays, self._prefix(prefix)[0]):
            a[0, :, :p] = kv
        self.decoder._run(state.buffers, 0, 1, np.asarray([ids], dtype=np.int64), np.array([p + n]), 1)
        return np.stack([a[0, :, p:p + n] for a in arrays])

    def prefill(self, prompts: Sequence[BlockPrompt | Sequence[int]],
                stats: BlockStats | Sequence[BlockStats | None] | None = None) -> tuple[np.ndarray, PackedState]:
        """Last-position logits (B, V) and the packed state, as `PackedDecoder.prefill` returns them.

        `stats` counts the blocks: one for all prompts, or one per prompt (each BlockPrompt's its
        own, as the server's batcher keeps them per request)."""
        per_prompt = list(stats) if isinstance(stats, (list, tuple)) else [
            stats if stats is not None else BlockStats()] * len(prompts)
        lengths = [len(b.ids) if isinstance(b, BlockPrompt) else len(b) for b in prompts]
        # One run with the assembly graph writes the repaired tokens after the cache before moving them.
        room = [n + (self._repaired(b) if isinstance(b, BlockPrompt) and self.decoder.assemble_session else 0)
                for n, b in zip(lengths, prompts)]
        state = self.decoder.empty_state(len(prompts), max(room) + GROW)
        logits = [self._assemble(state.buffers, row, prompt, per_prompt[row]) if isinstance(prompt, BlockPrompt)
                  else self.decoder.prefill_row(state.buffers, row, prompt)
                  for row, prompt in enumerate(prompts)]
        return np.concatenate(logits), PackedState(state.buffers, state.slots, np.array(lengths, dtype=np.int64))

    def _assemble(self, buffers: KVBuffers, row: int, prompt: BlockPrompt, stats: BlockStats) -> np.ndarray:
        t0 = time.perf_counter()
        repair_s = 0.0
        # With the assembly graph the repairs wait for the tail's run; without it each runs here.
        placed = self.decoder.assemble_session is not None
        repairs: list[tuple[int, Sequence[int]]] = []
        arrays = buffers.arrays
        p = len(prompt.prefix)
        for a, kv in zip(arrays, self._prefix(prompt.prefix)[0]):
            a[row, :, :p] = kv
        offset = p
        scales = self.decoder.kv_scales if arrays[0].dtype == KV_INT8 else None
        spec = self.decoder.spec
        for ids in prompt.blocks:
            kv = self.block(prompt.prefix, ids, stats)
            if scales is None:
                kv = widen(kv, arrays[0].dtype)
            n = len(ids)
            for i, a in enumerate(arrays):
                # Even entries are layer i // 2's keys (past names run k0, v0, k1, v1, ...); an int8 key
                # is turned in float.
                if i % 2:
                    a[row, :, offset:offset + n] = kv[i]
                elif scales is None:
                    a[row, :, offset:offset + n] = rotate_keys(kv[i], offset - p, spec, i // 2)
                else:
                    turned = rotate_keys(dequantize(kv[i], scales[i]), offset - p, spec, i // 2)
                    a[row, :, offset:offset + n] = quantize(turned, scales[i])
            if self.repair and offset > p:
                repairs.append((offset, ids[:self.repair]))
                if not placed:
                    t1 = time.perf_counter()
                    self.decoder._run(buffers, row, row + 1, np.asarray([ids[:self.repair]], dtype=np.int64),
                                      np.array([offset + len(repairs[-1][1])]), 1)
                    repair_s += time.perf_counter() - t1
            offset += n
        stats.assemble_ms += (time.perf_counter() - t0 - repair_s) * 1e3
        if placed and repairs:
            t1 = time.perf_counter()
            logits = self._repair_with_tail(buffers, row, repairs, offset, prompt.tail)
            stats.repair_ms += (time.perf_counter() - t1) * 1e3
            return logits
        stats.repair_ms += repair_s * 1e3
        tail = np.asarray([prompt.tail], dtype=np.int64)
        return self.decoder._run(buffers, row, row + 1, tail, np.array([offset + len(prompt.tail)]), 1)[:, -1]

    def _repair_with_tail(self, buffers: KVBuffers, row: int, repairs: list[tuple[int, Sequence[int]]], end: int,
                          tail: Sequence[int]) -> np.ndarray:
        """One run of the assembly graph over the assembled row (`end` positions): each block's
        repaired tokens at their places in the prompt, then the tail. Every token sees what it would
        see run in prompt order: places up to its own, the repaired tokens and not the copies they
        replace. The new keys and values land after the blocks; then each repaired token's moves over
        its copy, and the tail's to right after the blocks. Returns the tail's last logits."""
        tokens = [t for _, ids in repairs for t in ids] + list(tail)
        places = np.concatenate([np.arange(start, start + len(ids)) for start, ids in repairs]
                                + [np.arange(end, end + len(tail))])
        cache_places = np.concatenate([np.arange(end), places])
        visible = cache_places[None, :] <= places[:, None]
        for start, ids in repairs:
            visible[:, start:start + len(ids)] = False
        logits = self.decoder.run_placed(buffers, row, tokens, places, visible)
        repaired = len(tokens) - len(tail)
        for a in buffers.arrays:
            source = end
            for start, ids in repairs:
                a[row, :, start:start + len(ids)] = a[row, :, source:source + len(ids)]
                source += len(ids)
            a[row, :, end:end + len(tail)] = a[row, :, end + repaired:end + repaired + len(tail)]
        return logits


def unavailable_in(generator: GeneratorSpec, prompt: PromptSpec) -> str | None:
    """Why a bundle's manifest rules passage KV out, or None: read without opening a model."""
    if generator.cache != "packed":
        return "its generator graph has no packed cache (export it with --graph fused)"
    if not generator.rotary_base:
        return "its manifest does not record the generator's rotary positions (re-export the bundle)"
    if "{n}" in prompt.passage:
        return "its passage template numbers passages, so a passage renders differently by rank (re-export the bundle)"
    return None


def unavailable(decoder, prompt: PromptSpec) -> str | None:
    """Why this opened generator cannot reuse passage KV, or None when it can."""
    if isinstance(decoder, PackedDecoder) and decoder.kv_device is not None:
        return "passage KV is assembled in host memory, and this generator's cache lives on the GPU"
    return unavailable_in(decoder.spec, prompt)
