"""`ragrt export --ray --passage-kv all`: the passages' blocks computed by an actor pool on Ray.

A block is a generator pass over a passage's ~120 tokens after the prompt's prefix, far more work
than embedding it, so the store is where a cluster gains most. The pattern is ray_embed.py's:
each actor opens the bundle's own generator graph once (its files sent through Ray's object store) and
runs `PassageKV.compute`, the function the local export and the engine run, so a block is the
same wherever it ran; the driver writes the blocks into the store in order
(decoding/blockstore.py: `write_blocks`).
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ragrt.bundle.manifest import GeneratorSpec
from ragrt.decoding.blocks import block_dtype
from ragrt.decoding.blockstore import ComputeBlocks
from ragrt.errors import UserInputError
from ragrt.export.ray_embed import connected, ordered_pool
from ragrt.runtime.sessions import SessionConfig


@dataclass(frozen=True)
class RayBlocks:
    address: str = "local"          # "local": start a cluster on this machine; else a cluster address
    actors: int | None = None       # None: the cluster's CPUs // threads
    threads: int = 1                # onnxruntime intra-op threads (and CPUs reserved) per actor
    batch_blocks: int = 8           # blocks per actor call


def blocks_on_ray(config: RayBlocks, *, root: Path, spec: GeneratorSpec, graph_id: str) -> ComputeBlocks:
    """A `ComputeBlocks` that runs on Ray: the generator of the bundle at `root` (the graph blocks are
    computed by; `graph_id` its checksum)."""
    if config.threads < 1 or config.batch_blocks < 1 or (config.actors is not None and config.actors < 1):
        raise UserInputError(f"Ray passage KV needs at least one actor, thread and block per call, got {config}")

    def compute(prefix: tuple[int, ...], blocks: list[np.ndarray]) -> Iterator[np.ndarray]:
        with connected(config.address):
            yield from _compute(config, root, spec, graph_id, prefix, blocks)
    return compute


def _compute(config: RayBlocks, root: Path, spec: GeneratorSpec, graph_id: str,
             prefix: tuple[int, ...], blocks: list[np.ndarray]) -> Iterator[np.ndarray]:
    import ray
    from ray.data import ActorPoolStrategy

    actors = ordered_pool(config.actors, config.threads)     # the store is written in plan order
    # Materialized before the actor pool starts, so no task of this stage waits for a CPU the actors hold.
    items = ray.data.from_items([{"row": i, "ids": ids.astype(np.int64).tolist()} for i, ids in enumerate(blocks)]) \
        .repartition(target_num_rows_per_block=config.batch_blocks).materialize()
    computed = items.map_batches(
        _BlockComputer, batch_size=config.batch_blocks, batch_format="numpy", num_cpus=config.threads,
        compute=ActorPoolStrategy(size=min(actors, len(blocks))),
        fn_constructor_kwargs={"files": {p: ray.put((Path(root) / p).read_bytes()) for p in _graph_files(root, spec)},
                               "spec": spec, "graph_id": graph_id, "prefix": prefix, "threads": config.threads})
    two_l, heads, dim = 2 * spec.num_layers, spec.num_kv_heads, spec.head_dim
    expected = 0
    for batch in computed.iter_batches(batch_size=None, batch_format="numpy"):
        for row, kv in zip(batch["row"], batch["kv"]):
            if int(row) != expected:
                raise RuntimeError(f"Ray returned block {int(row)} where block {expected} was due")
            n = len(blocks[expected])
            yield np.frombuffer(kv, dtype=block_dtype(spec.kv_dtype)).reshape(two_l, heads, n, dim)
            expected += 1
    if expected != len(blocks):
        raise RuntimeError(f"Ray returned {expected} blocks of {len(blocks)}")


def _graph_files(root: Path, spec: GeneratorSpec) -> list[str]:
    """What opening the generator graph reads: the graph, its weights file, an int8 graph's scales."""
    return [p for p in (spec.model, spec.weights, spec.kv_scales if spec.kv_dtype == "int8" else "")
            if p and (Path(root) / p).exists()]


class _BlockComputer:
    """One actor of the pool: the generator graph, opened once, computing batch after batch of blocks."""

    def __init__(self, *, files: dict, spec: GeneratorSpec, graph_id: str, prefix: tuple[int, ...], threads: int):
        import ray
        from ragrt.decoding.blocks import PassageKV
        from ragrt.decoding.generator import load_decoder
        self._dir = tempfile.TemporaryDirectory(prefix="ragrt-generator-")
        for rel, ref in files.items():
            path = Path(self._dir.name) / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(ray.get(ref))
        decoder = load_decoder(Path(self._dir.name), spec, SessionConfig(device="cpu", threads=threads), steps=False,
                               assemble=False)
        self.passage_kv = PassageKV(decoder, graph_id)
        self.prefix = tuple(prefix)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        kv = [np.ascontiguousarray(self.passage_kv.compute(self.prefix, [int(t) for t in ids]),
                                   dtype=self.passage_kv.dtype).tobytes() for ids in batch["ids"]]
        return {"row": batch["row"], "kv": np.array(kv, dtype=object)}
