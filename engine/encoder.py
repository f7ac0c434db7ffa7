"""`TextEncoder`: texts -> L2-normalised embeddings through the bundle's ONNX encoder."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from tokenizers import Tokenizer

from .manifest import EncoderSpec
from .session import SessionConfig, create_session

# Texts are sorted by length inside windows of this many batches, so a batch pads to a
# similar length instead of to the longest text of the whole input.
BUCKET_WINDOW = 8


class TextEncoder:
    def __init__(self, model_path: Path, tokenizer_path: Path, *, max_length: int, dim: int,
                 session_config: SessionConfig = SessionConfig(), output: str = "embedding"):
        self.session = create_session(Path(model_path), session_config)
        self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length)
        self.dim = dim
        self.output = output
        self.input_names = {i.name for i in self.session.get_inputs()}

    @classmethod
    def from_spec(cls, root: Path, spec: EncoderSpec, session_config: SessionConfig) -> "TextEncoder":
        return cls(root / spec.model, root / spec.tokenizer, max_length=spec.max_length, dim=spec.dim,
                   session_config=session_config, output=spec.output)

    def _run(self, encodings) -> np.ndarray:
        width = max(len(e.ids) for e in encodings)
        ids = np.zeros((len(encodings), width), dtype=np.int64)
        mask = np.zeros((len(encodings), width), dtype=np.int64)
        for row, e in enumerate(encodings):
            ids[row, :len(e.ids)] = e.ids
            mask[row, :len(e.ids)] = 1
        feed = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.input_names:
            feed["token_type_ids"] = np.zeros_like(ids)
        return self.session.run([self.output], feed)[0]

    def embed(self, texts: Iterable[str], *, batch_size: int = 32) -> Iterator[np.ndarray]:
        """Yields float32 (n, dim) arrays, batch after batch, in input order."""
        window: list[str] = []
        for text in texts:
            window.append(text)
            if len(window) == batch_size * BUCKET_WINDOW:
                yield from self._embed_window(window, batch_size)
                window = []
        if window:
            yield from self._embed_window(window, batch_size)

    def _embed_window(self, texts: list[str], batch_size: int) -> Iterator[np.ndarray]:
        encodings = self.tokenizer.encode_batch(texts)
        order = np.argsort([len(e.ids) for e in encodings], kind="stable")
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), batch_size):
            rows = order[start:start + batch_size]
            out[rows] = self._run([encodings[i] for i in rows])
        for start in range(0, len(texts), batch_size):
            yield out[start:start + batch_size]

    def embed_all(self, texts: Sequence[str], *, batch_size: int = 32) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate(list(self.embed(texts, batch_size=batch_size)))
