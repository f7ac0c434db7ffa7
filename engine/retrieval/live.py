"""The retriever of the current corpus generation, swapped when `ragrt index add/remove` publishes a new one.

A request takes the retriever once and keeps it: an update never changes the passages of a request
already running, and the next request sees the new ones, with no restart.
"""
from __future__ import annotations

import logging
import threading

from ragrt.bundle.reader import Bundle
from ragrt.retrieval.encoder import TextEncoder
from ragrt.errors import BundleError
from ragrt.bundle.versions import Generation, open_generation, pointer_signature
from ragrt.retrieval.retriever import Retriever

log = logging.getLogger("ragrt")


class LiveRetriever:
    def __init__(self, bundle: Bundle, encoder: TextEncoder):
        self._bundle = bundle
        self._encoder = encoder
        self._lock = threading.Lock()
        self._signature = pointer_signature(bundle.root)
        # One attribute, so a swap is a single atomic assignment that readers see whole.
        self._current = (bundle.generation, _retriever(bundle.generation, encoder))

    @property
    def generation(self) -> Generation:
        self.get()
        return self._current[0]

    def get(self) -> Retriever:
        """A stat of the pointer per call; the new generation is opened only when it changed."""
        signature = pointer_signature(self._bundle.root)
        if signature != self._signature:
            with self._lock:
                if signature != self._signature:
                    self._reload(signature)
        return self._current[1]

    def _reload(self, signature) -> None:
        old = self._current[0]
        try:
            gen = open_generation(self._bundle.root, manifest_sha256=self._bundle.manifest_sha256)
            if gen.path != old.path:
                self._current = (gen, _retriever(gen, self._encoder))
                log.info("serving corpus %s (%d passages)", gen.name, gen.spec.passages.count)
        except BundleError as e:
            # The generation being served is intact; refusing every request would help nobody.
            log.warning("%s; still serving %s", e, old.name)
        self._signature = signature


def _retriever(gen: Generation, encoder: TextEncoder) -> Retriever:
    return Retriever.open(gen.path, gen.spec.index, gen.spec.passages, encoder, shards=gen.spec.shards,
                          bm25=gen.spec.bm25)
