"""`ragrt index add` / `ragrt index remove`: a new corpus generation, without a re-export.

Both write the next generation into a staging directory and publish it (engine/bundle/versions.py):
a crash leaves the old corpus or the new one. Of the index shards (retrieval/shards.py) only those
the update changes are rewritten (the one receiving added passages, those losing removed ones), the
others hard-linked from the current generation. `add` writes the new passages into a new segment of
the passage store and hard-links the old segments (retrieval/passages.py): besides the new passages
it writes only the store's row table (16 bytes a passage) and the receiving shard. `remove` rewrites
the store whole, compacted into one data file. New documents are chunked with the bundle's chunking
settings and embedded by its own encoder, so they are indistinguishable from exported ones.
A generation with a passage KV store (`--passage-kv all`) passes one on: the new generation's store
is written whole, each kept block copied from the old store and each new one computed by the
bundle's generator, so it never holds the blocks of removed passages (and an `add` to such a bundle
writes in proportion to the corpus again).

Ids: a passage is `<document id>#<n>` (retrieval/passages.py). Adding a document whose id the
bundle already holds is an error naming the file and line (remove it first: an update is then
explicit, never a silent overwrite). Removing takes passage ids or document ids (a document id
removes all its passages); an id that is neither is an error, and nothing is removed; so is
removing every passage.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ragrt.bundle.reader import Bundle
from ragrt.corpus.documents import chunk_documents, located_documents
from ragrt.retrieval.encoder import TextEncoder, load_tokenizer
from ragrt.errors import CorpusError
from ragrt.bundle.versions import (DATA_FILE, OFFSETS_FILE, ROWS_FILE, Generation, publish, remove_unused,
                                   segment_file, staging, update_lock)
from ragrt.bundle.manifest import PassagesSpec
from ragrt.decoding.blockstore import has_store, write_store
from ragrt.runtime.sessions import SessionConfig
from ragrt.retrieval.index import build_index, open_index, stored
from ragrt.retrieval.passages import (Passage, PassageStore, add_segment, document_of, passage_text,
                                      write_passage_store)
from ragrt.retrieval.shards import first_rows, receiving_shard


@dataclass(frozen=True)
class UpdateResult:
    generation: str                # the new current generation
    added: int                     # passages
    removed: int                   # passages
    passages: int                  # in the new generation
    documents: int


def add_documents(bundle_path: str | Path, corpus: str | Path, *, threads: int = 0) -> UpdateResult:
    with update_lock(Path(bundle_path)):
        bundle, gen, store = _open(bundle_path)
        have = {document_of(i) for i in store.ids()}
        docs = []
        for doc, where in located_documents(corpus):
            if doc.id in have:
                raise CorpusError(f"{where}: document {doc.id!r} is already in the bundle; "
                                  "remove it first with `ragrt index remove`")
            docs.append(doc)
        m = bundle.manifest
        tokenizer = load_tokenizer(bundle.path(m.encoder.tokenizer))
        new = list(chunk_documents(docs, tokenizer, max_tokens=m.chunking.max_tokens, overlap=m.chunking.overlap))
        if not new:
            raise CorpusError(f"{corpus}: the documents have no text to index")
        encoder = TextEncoder.from_spec(bundle.root, m.encoder, SessionConfig(threads=threads))
        vectors = encoder.embed_all([passage_text(p) for p in new], passages=True)
        counts = [s.count for s in gen.spec.index_shards]
        j = receiving_shard(counts)
        index = _open_index(gen, j, view=False)       # a private, writable copy of the shard's graph
        keys = np.arange(counts[j], counts[j] + len(new), dtype=np.uint64)
        index.add(keys, stored(vectors, gen.spec.index_shards[j]))
        end = first_rows(counts)[j] + counts[j]       # the new rows follow the shard's own
        with staging(bundle.root) as tmp:
            for rel in store.spec.data_files:
                os.link(gen.file(rel), tmp / rel)     # never written again: see bundle/versions.py
            passages = add_segment(store, tmp, segment=segment_file(gen.spec.number + 1), rows=ROWS_FILE,
                                   records=new, at=end)
            return _publish(bundle, gen, tmp, {j: index}, passages, added=len(new), removed=0,
                            documents=len(have) + len(docs), threads=threads)


def remove_ids(bundle_path: str | Path, ids_file: str | Path, *, threads: int = 0) -> UpdateResult:
    wanted = read_ids(Path(ids_file))
    with update_lock(Path(bundle_path)):
        bundle, gen, store = _open(bundle_path)
        ids = list(store.ids())
        by_document: dict[str, list[int]] = {}
        for row, pid in enumerate(ids):
            by_document.setdefault(document_of(pid), []).append(row)
        by_passage = {pid: [row] for row, pid in enumerate(ids)}     # a passage id wins over a document id
        rows = {**by_document, **by_passage}
        unknown = [(i, where) for i, where in wanted if i not in rows]
        if unknown:
            i, where = unknown[0]
            raise CorpusError(f"{where}: no passage or document with id {i!r} in the bundle "
                              f"({len(unknown)} unknown ids in all); nothing was removed")
        drop = {row for i, _ in wanted for row in rows[i]}
        keep = np.array([row for row in range(len(store)) if row not in drop], dtype=np.uint64)
        if not len(keep):
            # as export refuses an empty corpus: an engine without passages has nothing to answer from
            raise CorpusError(f"{ids_file}: these ids are every passage in the bundle; nothing was removed")
        documents = len({document_of(ids[row]) for row in keep})
        rebuilt = {}
        specs = gen.spec.index_shards
        for j, (spec, first) in enumerate(zip(specs, first_rows([s.count for s in specs]))):
            if any(first <= row < first + spec.count for row in drop):
                old = _open_index(gen, j, view=True)
                kept_keys = np.array([key for key in range(spec.count) if first + key not in drop], dtype=np.uint64)
                # The stored vectors, copied as they are (f16/i8), so kept passages score exactly as before.
                vectors = np.vstack(old.get(kept_keys)) if len(kept_keys) else np.empty((0, spec.ndim), np.float32)
                rebuilt[j] = build_index(vectors, spec)
        with staging(bundle.root) as tmp:
            count = write_passage_store(tmp / DATA_FILE, tmp / OFFSETS_FILE, (store.get(int(row)) for row in keep))
            return _publish(bundle, gen, tmp, rebuilt, PassagesSpec(DATA_FILE, OFFSETS_FILE, count), added=0,
                            removed=len(drop), documents=documents, threads=threads)


def read_ids(path: Path) -> list[tuple[str, str]]:
    """(id, "file:line") for each non-blank line; surrounding whitespace is not part of an id."""
    if not path.is_file():
        raise CorpusError(f"{path}: no such file")
    ids = []
    for n, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise CorpusError(f"{path}:{n}: not UTF-8 text") from None
        if line:
            ids.append((line, f"{path}:{n}"))
    if not ids:
        raise CorpusError(f"{path}: no ids in the file")
    return ids


def _open(bundle_path: str | Path) -> tuple[Bundle, Generation, PassageStore]:
    bundle = Bundle.open(bundle_path)
    remove_unused(bundle.root)       # what an update killed before its swap left behind
    gen = bundle.generation
    return bundle, gen, PassageStore.open(gen.path, gen.spec.passages)


def _records(store: PassageStore) -> Iterator[Passage]:
    return (store.get(row) for row in range(len(store)))


def _open_index(gen: Generation, shard: int, *, view: bool):
    spec = gen.spec.index_shards[shard]
    return open_index(gen.file(spec.path), spec, view=view)


def _publish(bundle: Bundle, gen: Generation, tmp: Path, changed: dict, passages: PassagesSpec, *,
             added: int, removed: int, documents: int, threads: int) -> UpdateResult:
    """Completes staging directory `tmp`, which holds the new passage store `passages`, and publishes it.
    `changed`: the new index of each shard the update changed, by shard number."""
    shards = []
    for j, spec in enumerate(gen.spec.index_shards):
        (tmp / spec.path).parent.mkdir(parents=True, exist_ok=True)
        if j in changed:
            changed[j].save(str(tmp / spec.path))
            spec = dataclasses.replace(spec, count=len(changed[j]))
        else:
            os.link(gen.file(spec.path), tmp / spec.path)    # never written again: see bundle/versions.py
        shards.append(spec)
    if has_store(gen):
        # The generator is opened only here: most bundles have no store, and it costs a session.
        written = PassageStore.open(tmp, passages)
        write_store(bundle.root, bundle.manifest, tmp, _records(written),
                    session_config=SessionConfig(device="cpu", threads=threads), reuse=gen.path)
    new = publish(bundle.root, tmp, number=gen.spec.number + 1, manifest_sha256=bundle.manifest_sha256,
                  index=shards[0], shards=tuple(shards[1:]), passages=passages, documents=documents,
                  linked_from=gen)
    return UpdateResult(new.name, added, removed, passages.count, documents)
