"""`ragrt export --ray`: chunking and embedding the corpus on a Ray cluster.

Ray Data chunks the documents with `chunk_documents` (the local export's function, one document
at a time, so passage ids and rows are the same) and an actor pool embeds the passages, each
actor opening the bundle's fp32 encoder graph once through `TextEncoder`. The driver gathers the
passages and their vectors in passage order; the index, shards and manifest are then the local
export's. Every node needs ragrt installed with the [ray] extra; the graph and tokenizer travel
through Ray's object store, so worker machines need no copy of the driver's model cache.
"""
from __future__ import annotations

import logging
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from tokenizers import Tokenizer

from ragrt.corpus.documents import Document, chunk_documents, read_documents
from ragrt.corpus.text import valid_unicode
from ragrt.errors import CorpusError, UserInputError
from ragrt.retrieval.encoder import TextEncoder
from ragrt.retrieval.passages import Passage, document_of, passage_text
from ragrt.runtime.sessions import SessionConfig

EXTRA = "pip install 'ragrt[ray]'"
PARQUET_COLUMNS = ("id", "text", "title")
# Start every actor of the pool before the first batch goes out, but not forever: a cluster
# that cannot place them all (too few CPUs) should fail, not hang.
ACTOR_START_TIMEOUT_S = 600


@dataclass(frozen=True)
class RayEmbedding:
    address: str = "local"          # "local": start a cluster on this machine; else a cluster address
    actors: int | None = None       # None: the cluster's CPUs // threads
    threads: int = 1                # onnxruntime intra-op threads (and CPUs reserved) per actor
    batch_rows: int = 256           # passages per actor call: BUCKET_WINDOW batches of 32


@dataclass(frozen=True)
class RayEmbedded:
    passages: list[Passage]
    vectors: np.ndarray             # (len(passages), dim) float32, row i is passage i
    seconds: float                  # chunking and embedding, cluster start excluded
    nodes: dict[str, int]           # Ray node id -> passages its actors embedded
    actors: int
    threads: int
    # When the pool's first round of batches (one per actor) had reached the driver, and the passages
    # they held: the pool's start (chunking, actors opening the graph) is before it, and the rate
    # after it is the pool's steady rate.
    first_round_s: float = 0.0
    first_round_rows: int = 0

    @property
    def steady_rate(self) -> float:
        """Passages/s after the first round of batches."""
        return (len(self.passages) - self.first_round_rows) / max(self.seconds - self.first_round_s, 1e-9)


def require_ray() -> None:
    try:
        import ray  # noqa: F401
    except ImportError:
        raise UserInputError(f"--ray needs Ray, which is not installed: {EXTRA}") from None


def is_parquet(path: Path) -> bool:
    path = Path(path)
    if path.is_dir():
        return any(path.glob("*.parquet")) and not any(path.glob("*.jsonl"))
    return path.suffix.lower() == ".parquet"


def read_corpus(path: Path) -> tuple[list[Document] | Path, int]:
    """(what `embed_on_ray` takes, the number of documents). JSONL and text directories are read
    here by `read_documents`, as the local export reads them (its checks, unique ids, titles),
    which costs little next to embedding; a Parquet corpus (columns id, text, title), for corpora
    too big for that, is only checked here and read by Ray Data's workers."""
    require_ray()
    if not is_parquet(path):
        docs = list(read_documents(path))
        return docs, len(docs)
    import pyarrow.dataset as pads
    try:
        dataset = pads.dataset(str(path), format="parquet")
    except Exception as e:  # pyarrow raises several types for an unreadable file
        raise CorpusError(f"{path}: not a readable Parquet corpus ({e})") from None
    missing = [c for c in ("id", "text") if c not in dataset.schema.names]
    if missing:
        raise CorpusError(f"{path}: a Parquet corpus needs columns id, text (and optionally title); "
                          f"missing {', '.join(missing)}")
    rows = dataset.count_rows()
    if not rows:
        raise CorpusError(f"{path}: the corpus has no documents")
    return Path(path), rows


def embed_on_ray(corpus: Sequence[Document] | Path, ray_config: RayEmbedding, *, model: Path, tokenizer: Path,
                 max_length: int, dim: int, max_tokens: int, overlap: int, passage_prefix: str = "",
                 progress: bool = True) -> RayEmbedded:
    """Chunks `corpus` (documents, or a Parquet path from `read_corpus`) and embeds its passages on
    Ray. Uses the process's Ray connection if there is one, else opens one to `ray_config.address`
    and closes it at the end."""
    with connected(ray_config.address):
        return _embed(corpus, ray_config, model=model, tokenizer=tokenizer, max_length=max_length, dim=dim,
                      max_tokens=max_tokens, overlap=overlap, passage_prefix=passage_prefix, progress=progress)


def ordered_pool(actors: int | None, threads: int) -> int:
    """Sets Ray Data up for an actor pool whose results come back in input order, and returns the
    pool's size: `actors`, or the cluster's CPUs // `threads`. Progress is the caller's own bar."""
    import ray
    from ray.data import DataContext
    ctx = DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
    ctx.enable_progress_bars = False
    return actors or max(1, int(ray.cluster_resources().get("CPU", 1)) // threads)


@contextmanager
def connected(address: str) -> Iterator[None]:
    """The process's Ray connection if there is one, else one to `address` ("local": a cluster
    started on this machine), closed on exit."""
    import ray
    started = not ray.is_initialized()
    if started:
        if address == "local":
            ray.init(include_dashboard=False, logging_level=logging.WARNING)
        else:
            ray.init(address=address, logging_level=logging.WARNING)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def _embed(corpus, ray_config: RayEmbedding, *, model: Path, tokenizer: Path, max_length: int, dim: int,
           max_tokens: int, overlap: int, passage_prefix: str, progress: bool) -> RayEmbedded:
    import ray
    from ray.data import ActorPoolStrategy
    from tqdm import tqdm

    if ray_config.threads < 1 or (ray_config.actors is not None and ray_config.actors < 1) \
            or ray_config.batch_rows < 1:
        raise UserInputError(f"Ray embedding needs at least one actor, thread and row per batch, got {ray_config}")
    actors = ordered_pool(ray_config.actors, ray_config.threads)     # passage order is row order, the index's keys

    t0 = time.perf_counter()
    if isinstance(corpus, Path):
        source = ray.data.read_parquet(str(corpus)).select_columns(_parquet_columns(corpus))
    else:
        source = ray.data.from_items([{"id": d.id, "text": d.text, "title": d.title} for d in corpus])
    # Materialized before the actor pool starts: its total sizes the progress bar, and no task of
    # this stage then waits for a CPU that the actors hold. Blocks of one actor call each, so that
    # every actor of the pool gets work from the first batches.
    chunks = source.map_batches(_chunk_batch, batch_format="numpy", fn_kwargs={
        "tokenizer_json": Path(tokenizer).read_text(encoding="utf-8"), "max_tokens": max_tokens, "overlap": overlap,
    }).repartition(target_num_rows_per_block=ray_config.batch_rows).materialize()
    total = chunks.count()
    embedded = chunks.map_batches(
        _Embedder, batch_size=ray_config.batch_rows, batch_format="numpy", num_cpus=ray_config.threads,
        compute=ActorPoolStrategy(size=actors),
        fn_constructor_kwargs={"files": {"model": ray.put(Path(model).read_bytes()),
                                         "tokenizer": ray.put(Path(tokenizer).read_bytes())},
                               "max_length": max_length, "dim": dim, "threads": ray_config.threads,
                               "passage_prefix": passage_prefix})

    passages: list[Passage] = []
    vectors = np.empty((total, dim), dtype=np.float32)
    nodes: dict[str, int] = {}
    with tqdm(total=total, desc=f"embedding passages on Ray ({actors} actors x {ray_config.threads} threads)",
              unit="passage", disable=not progress) as bar:
        first, batches = (0.0, 0), 0
        for batch in embedded.iter_batches(batch_size=None, batch_format="numpy"):
            n = len(batch["id"])
            batches += 1
            if batches <= actors:
                first = (time.perf_counter() - t0, len(passages) + n)
            vectors[len(passages):len(passages) + n] = batch["vector"]
            passages += [Passage(str(i), str(t), str(x)) for i, t, x in zip(batch["id"], batch["title"], batch["text"])]
            for node in batch["node"]:
                nodes[str(node)] = nodes.get(str(node), 0) + 1
            bar.update(n)
    if len(passages) != total:
        raise RuntimeError(f"Ray returned {len(passages)} embedded passages of {total}")
    _check_unique(passages, corpus)
    return RayEmbedded(passages, vectors, time.perf_counter() - t0, nodes, actors, ray_config.threads, *first)


def _parquet_columns(path: Path) -> list[str]:
    import pyarrow.dataset as pads
    names = pads.dataset(str(path), format="parquet").schema.names
    return [c for c in PARQUET_COLUMNS if c in names]


def _check_unique(passages: list[Passage], corpus) -> None:
    """Read on the driver, documents were checked by `read_documents`; Parquet rows are checked here."""
    seen: set[str] = set()
    for p in passages:
        if p.id in seen:
            raise CorpusError(f"{corpus}: duplicate document id {document_of(p.id)!r}")
        seen.add(p.id)


def _document(doc_id, text, title) -> Document:
    """A Parquet row held to the local export's rules for a JSONL line (documents.py)."""
    if doc_id is None or isinstance(doc_id, (bool, np.bool_)) or not str(doc_id).strip():
        raise CorpusError(f'a document id must be a non-empty string or integer, got {doc_id!r}')
    if not isinstance(text, str) or not text.strip():
        raise CorpusError(f'document {doc_id!r}: "text" must be a non-empty string')
    if title is not None and not isinstance(title, str):
        raise CorpusError(f'document {doc_id!r}: "title" must be a string')
    return Document(valid_unicode(str(doc_id)), valid_unicode(text), valid_unicode(title or ""))


def _chunk_batch(batch: dict[str, np.ndarray], *, tokenizer_json: str, max_tokens: int,
                 overlap: int) -> dict[str, list[str]]:
    titles = batch["title"] if "title" in batch else [None] * len(batch["id"])
    docs = [_document(_scalar(i), _scalar(x), _scalar(t)) for i, x, t in zip(batch["id"], batch["text"], titles)]
    passages = list(chunk_documents(docs, Tokenizer.from_str(tokenizer_json), max_tokens=max_tokens, overlap=overlap))
    return {"id": [p.id for p in passages], "title": [p.title for p in passages], "text": [p.text for p in passages]}


def _scalar(value):
    """A numpy scalar from a batch column as the Python value the JSONL reader would have seen."""
    return value.item() if isinstance(value, np.generic) else value


class _Embedder:
    """One actor of the pool: the fp32 encoder graph, opened once, embedding batch after batch."""

    def __init__(self, *, files: dict, max_length: int, dim: int, threads: int, passage_prefix: str):
        import ray
        self._dir = tempfile.TemporaryDirectory(prefix="ragrt-encoder-")
        paths = {}
        for name, ref in files.items():
            paths[name] = Path(self._dir.name) / name
            paths[name].write_bytes(ray.get(ref))
        self.encoder = TextEncoder(paths["model"], paths["tokenizer"], max_length=max_length, dim=dim,
                                   session_config=SessionConfig(threads=threads), passage_prefix=passage_prefix)
        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        passages = [Passage(str(i), str(t), str(x)) for i, t, x in zip(batch["id"], batch["title"], batch["text"])]
        vectors = self.encoder.embed_all([passage_text(p) for p in passages], passages=True)
        return {**batch, "vector": vectors, "node": np.array([self.node] * len(passages))}
