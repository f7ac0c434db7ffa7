"""The passage KV store: every passage's block precomputed into its corpus generation (`--passage-kv all`).

    passage_kv.bin   the blocks back to back, each (layers x {key, value}, kv_heads, n_tokens, head_dim)
    passage_kv.idx   .npz: `blocks` (16-byte content key, byte offset, n_tokens), and the identity the keys
                     were made with: `graph_id` (the generator's sha256), `prefix` (the qa task's token ids);
                     `dtype` of the blocks (absent: float16)

A generation has a store when its files list passage_kv.idx; `ragrt index add/remove` then write the
next generation's store beside its passages (corpus/update.py). Keys are `PassageKV.key`s, which
name the graph, the prefix and the block's tokens, so a block is found only for the very tokens it
was computed from: a changed passage misses and is computed at question time, never served stale.
Stored as the in-memory cache keeps them (`block_dtype`: float16, int8 for an int8 cache): half the
disk and page cache of float32 or less, and the same logits whether a block was precomputed, cached
or computed at question time.
"""
from __future__ import annotations

import hashlib
import io
import logging
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from tokenizers import Tokenizer

from ragrt.bundle.atomic import atomic_open
from ragrt.bundle.manifest import Manifest
from ragrt.bundle.versions import PASSAGE_KV_FILE, PASSAGE_KV_INDEX, Generation
from ragrt.decoding.blocks import BLOCK_DTYPE, PassageKV, unavailable
from ragrt.decoding.generator import load_decoder
from ragrt.decoding.prompt import PromptBuilder
from ragrt.errors import BundleError, UserInputError
from ragrt.retrieval.passages import Passage
from ragrt.runtime.sessions import SessionConfig

log = logging.getLogger("ragrt")

_ENTRY = np.dtype([("key", "V16"), ("offset", "<u8"), ("n_tokens", "<u4")])


@dataclass(frozen=True)
class StoreSummary:
    blocks: int
    tokens: int
    bytes: int                     # of passage_kv.bin
    computed: int                  # blocks run through the graph; the rest were copied from `reuse`


def has_store(gen: Generation) -> bool:
    return PASSAGE_KV_INDEX in gen.spec.files


def graph_id(manifest: Manifest) -> str:
    """What `PassageKV` salts keys with, as the engine passes it: the generator graph's sha256, and
    where the graph keeps its weights in a file of their own, a digest of both."""
    g = manifest.generator
    ids = [manifest.files[path].sha256 for path in (g.model, g.weights) if path in manifest.files]
    return ids[0] if len(ids) == 1 else hashlib.sha256(":".join(ids).encode()).hexdigest()


def qa_builder(manifest: Manifest, tokenizer: Tokenizer) -> PromptBuilder:
    """The builder whose blocks the store holds: the qa task's, the whole context as budget."""
    return PromptBuilder(manifest.prompt, tokenizer, budget=manifest.generator.max_context)


class BlockStore:
    """One generation's precomputed blocks, memory-mapped; `get` is what `PassageKV` asks its `store`."""

    def __init__(self, data: np.ndarray, entries: np.ndarray, *, graph_id: str, prefix: tuple[int, ...],
                 shape: tuple[int, int, int], dtype: np.dtype):
        self._data = data                                  # flat, as stored
        self._rows = {bytes(e["key"]): (int(e["offset"]) // data.itemsize, int(e["n_tokens"])) for e in entries}
        self.graph_id, self.prefix = graph_id, prefix
        self.shape = shape                                 # (layers x {key, value}, kv_heads, head_dim)
        self.dtype = dtype                                 # what `get` returns: the decoder's cache dtype
        self.tokens = int(entries["n_tokens"].sum())

    @classmethod
    def open(cls, directory: Path, *, dtype: np.dtype | str = np.float32) -> "BlockStore":
        data_path, index_path = Path(directory) / PASSAGE_KV_FILE, Path(directory) / PASSAGE_KV_INDEX
        with np.load(index_path, allow_pickle=False) as z:
            entries, graph_id, prefix, shape = z["blocks"], str(z["graph_id"]), z["prefix"], z["shape"]
            stored = str(z["dtype"]) if "dtype" in z else BLOCK_DTYPE.name
        if stored not in ("float16", "int8"):
            raise BundleError(f"{index_path}: blocks of type {stored!r}, not float16 or int8; the bundle is corrupted")
        stored = np.dtype(stored)
        size = data_path.stat().st_size
        two_l, heads, dim = (int(x) for x in shape)
        per_token = two_l * heads * dim * stored.itemsize
        if entries.dtype != _ENTRY:
            raise BundleError(f"{index_path}: not a passage KV index; the bundle is corrupted")
        ends = entries["offset"] + entries["n_tokens"].astype(np.uint64) * per_token
        if len(ends) and int(ends.max()) > size:
            raise BundleError(f"{index_path}: its blocks do not fit {data_path}; the bundle is corrupted")
        data = np.memmap(data_path, dtype=stored, mode="r") if size else np.empty(0, stored)
        return cls(data, entries, graph_id=graph_id, prefix=tuple(int(t) for t in prefix),
                   shape=(two_l, heads, dim), dtype=np.dtype(dtype))

    def __len__(self) -> int:
        return len(self._rows)

    def keys(self) -> set[bytes]:
        return set(self._rows)

    @property
    def nbytes(self) -> int:
        return self._data.nbytes

    def stored(self, key: bytes) -> np.ndarray | None:
        """The block as stored: a read-only view of the file."""
        row = self._rows.get(key)
        if row is None:
            return None
        start, n = row
        two_l, heads, dim = self.shape
        return self._data[start:start + two_l * heads * n * dim].reshape(two_l, heads, n, dim)

    def get(self, key: bytes) -> np.ndarray | None:
        kv = self.stored(key)
        return None if kv is None else kv.astype(self.dtype, copy=False)

    def __contains__(self, key: bytes) -> bool:
        return key in self._rows


# Computes blocks elsewhere (export/ray_passage_kv.py): given the prefix and the blocks' token ids,
# yields their keys and values in that order, as `PassageKV.compute` gives them.
ComputeBlocks = Callable[[tuple[int, ...], list[np.ndarray]], Iterable[np.ndarray]]


def write_blocks(directory: Path, passage_kv: PassageKV, builder: PromptBuilder, passages: Iterable[Passage], *,
                 reuse: BlockStore | None = None, compute: ComputeBlocks | None = None) -> StoreSummary:
    """Writes the store of `passages` into `directory`: each distinct block once, copied from `reuse`
    when it holds it, else computed (by `passage_kv`, or by `compute`). Refuses, before writing, a
    store larger than the free disk space.

    Passages too long to be a block even with an empty question are left out, as every question
    would leave them out. The data goes in first and the index last, each renamed into place."""
    from tqdm import tqdm      # a dependency of tokenizers' huggingface_hub, so present in the runtime too

    prefix = builder.build_blocks("", [])[0].prefix
    plan: dict[bytes, np.ndarray] = {}
    for p in passages:
        for ids in builder.build_blocks("", [p])[0].blocks:
            plan.setdefault(passage_kv.key(prefix, ids), np.asarray(ids, dtype=np.int64))
    spec = passage_kv.decoder.spec
    shape = (2 * spec.num_layers, spec.num_kv_heads, spec.head_dim)
    stored = passage_kv.dtype
    per_token = int(np.prod(shape)) * stored.itemsize
    tokens = sum(len(ids) for ids in plan.values())
    free = shutil.disk_usage(directory).free
    if tokens * per_token > free:
        raise UserInputError(f"passage KV for {len(plan)} passages needs {tokens * per_token / 1e9:.2f} GB and "
                             f"{directory} has {free / 1e9:.2f} GB free; free some space or use --passage-kv lazy")
    if reuse is not None and (reuse.graph_id, reuse.prefix) != (passage_kv.graph_id, prefix):
        reuse = None           # made for another graph or prompt: none of its keys can match
    missing = [ids for key, ids in plan.items() if reuse is None or reuse.stored(key) is None]
    blocks = iter(compute(prefix, missing) if compute is not None and missing
                  else (passage_kv.compute(prefix, ids.tolist()) for ids in missing))
    entries = np.zeros(len(plan), dtype=_ENTRY)
    offset = computed = 0
    with atomic_open(Path(directory) / PASSAGE_KV_FILE, "wb") as f, \
            tqdm(total=len(plan), desc="passage KV", unit="block") as bar:
        for i, (key, ids) in enumerate(plan.items()):
            kv = reuse.stored(key) if reuse is not None else None
            if kv is None:
                kv = next(blocks)
                if kv.shape != (shape[0], shape[1], len(ids), shape[2]):
                    raise RuntimeError(f"a computed block has shape {kv.shape}, not that of its {len(ids)} tokens")
                computed += 1
            f.write(np.ascontiguousarray(kv, dtype=stored).tobytes())
            entries[i] = (key, offset, len(ids))
            offset += len(ids) * per_token
            bar.update(1)
    buf = io.BytesIO()
    np.savez(buf, blocks=entries, graph_id=np.array(passage_kv.graph_id), prefix=np.asarray(prefix, dtype=np.int64),
             shape=np.asarray(shape, dtype=np.int64), dtype=np.array(stored.name))
    with atomic_open(Path(directory) / PASSAGE_KV_INDEX, "wb") as f:
        f.write(buf.getvalue())
    return StoreSummary(len(plan), tokens, offset, computed)


def write_store(bundle_root: Path, manifest: Manifest, directory: Path, passages: Iterable[Passage], *,
                session_config: SessionConfig | None = None, reuse: Path | None = None,
                compute: ComputeBlocks | None = None) -> StoreSummary:
    """`write_blocks` with the bundle's own generator, opened as the engine opens it (on the CPU, where
    passage KV is assembled); `reuse`: a generation directory whose store supplies the blocks it holds."""
    from ragrt.retrieval.encoder import load_tokenizer
    decoder = load_decoder(bundle_root, manifest.generator, session_config or SessionConfig(device="cpu"),
                           steps=False, assemble=False)
    why = unavailable(decoder, manifest.prompt)
    if why is not None:
        raise UserInputError(f"passage KV cannot be precomputed for this bundle: {why}; use --passage-kv lazy")
    tokenizer = load_tokenizer(Path(bundle_root) / manifest.generator.tokenizer)
    passage_kv = PassageKV(decoder, graph_id(manifest))
    old = BlockStore.open(reuse) if reuse is not None else None
    return write_blocks(directory, passage_kv, qa_builder(manifest, tokenizer), passages, reuse=old, compute=compute)


class LiveBlockStore:
    """The store of whichever corpus generation is current, for an engine that outlives
    `ragrt index add/remove`. Keys name content, so a block found in a newer generation than the
    one a request retrieved from is still the right one."""

    def __init__(self, generation: Callable[[], Generation], *, graph_id: str, prefix: Sequence[int],
                 dtype: np.dtype):
        self._generation = generation
        self._identity = (graph_id, tuple(prefix))
        self._dtype = dtype
        self._lock = threading.Lock()
        self._current: tuple[Path | None, BlockStore | None] = (None, None)

    def get(self, key: bytes) -> np.ndarray | None:
        store = self._store()
        return None if store is None else store.get(key)

    def __contains__(self, key: bytes) -> bool:
        """Stored, read without reading the block."""
        store = self._store()
        return store is not None and key in store

    def _store(self) -> BlockStore | None:
        """The current generation's store, opened on first use after each generation change."""
        gen = self._generation()
        path, store = self._current
        if gen.path != path:
            with self._lock:
                if self._current[0] != gen.path:
                    self._current = (gen.path, self._open(gen))
                path, store = self._current
        return store

    def _open(self, gen: Generation) -> BlockStore | None:
        if not has_store(gen):
            return None
        store = BlockStore.open(gen.path, dtype=self._dtype)
        if (store.graph_id, store.prefix) != self._identity:
            log.warning("%s: its passage KV was computed for another generator graph or prompt; computing blocks "
                        "at question time instead (re-export with --passage-kv all)", gen.path / PASSAGE_KV_INDEX)
            return None
        return store


def live_store(generation: Callable[[], Generation], manifest: Manifest, tokenizer: Tokenizer) -> LiveBlockStore | None:
    """The engine's `PassageKV` store; None when the current generation has none."""
    if not has_store(generation()):
        return None
    prefix = qa_builder(manifest, tokenizer).build_blocks("", [])[0].prefix
    return LiveBlockStore(generation, graph_id=graph_id(manifest), prefix=prefix,
                          dtype=np.dtype(manifest.generator.kv_dtype))
