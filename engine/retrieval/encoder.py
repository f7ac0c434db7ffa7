"""`TextEncoder`: texts -> L2-normalised embeddings through the bundle's ONNX encoder."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from tokenizers import Tokenizer

from ragrt.errors import BundleError, UserInputError
from ragrt.bundle.manifest import EncoderSpec
from ragrt.runtime.sessions import SessionConfig, create_session
from ragrt.corpus.text import valid_unicode
from ragrt.retrieval.passages import Passage, passage_text

# Texts are sorted by length inside windows of this many batches, so a batch pads to a
# similar length instead of to the longest text of the whole input.
BUCKET_WINDOW = 8
# The inputs an encoder graph may take (EncoderSpec.inputs); token_type_ids, which some exported
# BERTs keep, is all zeros for single-segment text.
REQUIRED_INPUTS = ("input_ids", "attention_mask")
OPTIONAL_INPUTS = ("token_type_ids",)


def load_tokenizer(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for a missing or bad file
        raise BundleError(f"{path}: not a readable tokenizer ({e})") from None


class TextEncoder:
    def __init__(self, model_path: Path, tokenizer_path: Path, *, max_length: int, dim: int,
                 session_config: SessionConfig = SessionConfig(), output: str = "embedding",
                 inputs: tuple[str, ...] = REQUIRED_INPUTS, query_prefix: str = "", passage_prefix: str = ""):
        model_path = Path(model_path)
        self.session = create_session(model_path, session_config)
        self.tokenizer = load_tokenizer(tokenizer_path)
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length)
        self.dim = dim
        self.max_length = max_length
        self.output = output
        # Put before every text (EncoderSpec): e5 and bge were trained to tell questions from passages so.
        self.prefixes = {False: query_prefix, True: passage_prefix}
        if not set(REQUIRED_INPUTS) <= set(inputs) <= set(REQUIRED_INPUTS + OPTIONAL_INPUTS):
            raise BundleError(f"{model_path}: encoder inputs must be {', '.join(REQUIRED_INPUTS)} and optionally "
                              f"{', '.join(OPTIONAL_INPUTS)}; the manifest names {', '.join(inputs)}")
        graph_inputs = {i.name for i in self.session.get_inputs()}
        if graph_inputs != set(inputs):
            raise BundleError(f"{model_path}: encoder graph takes input(s) {', '.join(sorted(graph_inputs))}, "
                              f"the manifest names {', '.join(inputs)}; re-export the bundle")
        self._token_types = "token_type_ids" in inputs
        outputs = {o.name: o.shape for o in self.session.get_outputs()}
        if output not in outputs:
            raise BundleError(f"{model_path}: encoder graph has no output {output!r} (has {', '.join(outputs)})")
        width = outputs[output][-1]
        if isinstance(width, int) and width != dim:
            raise BundleError(f"{model_path}: encoder output is {width}-dimensional, manifest says {dim}")

    @classmethod
    def from_spec(cls, bundle_root: Path, spec: EncoderSpec, session_config: SessionConfig) -> "TextEncoder":
        return cls(bundle_root / spec.model, bundle_root / spec.tokenizer, max_length=spec.max_length, dim=spec.dim,
                   session_config=session_config, output=spec.output, inputs=spec.inputs,
                   query_prefix=spec.query_prefix, passage_prefix=spec.passage_prefix)

    def embed(self, texts: Iterable[str], *, batch_size: int = 32, passages: bool = False) -> Iterator[np.ndarray]:
        """Yields float32 (n, dim) arrays, batch after batch, in input order. The texts are questions,
        or with `passages` passages: each gets its kind's prefix."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise UserInputError(f"batch_size must be a positive integer, got {batch_size!r}")
        return self._embed(texts, batch_size, self.prefixes[passages])

    def embed_all(self, texts: Sequence[str], *, batch_size: int = 32, passages: bool = False) -> np.ndarray:
        """(len(texts), dim) float32."""
        batches = list(self.embed(texts, batch_size=batch_size, passages=passages))
        return np.concatenate(batches) if batches else np.zeros((0, self.dim), dtype=np.float32)

    def _embed(self, texts: Iterable[str], batch_size: int, prefix: str) -> Iterator[np.ndarray]:
        window: list[str] = []
        for text in texts:
            if not isinstance(text, str):
                raise UserInputError(f"texts to embed must be strings, got {type(text).__name__}")
            window.append(prefix + valid_unicode(text))
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

    def _run(self, encodings) -> np.ndarray:
        width = max(len(e.ids) for e in encodings)
        ids = np.zeros((len(encodings), width), dtype=np.int64)
        mask = np.zeros((len(encodings), width), dtype=np.int64)
        for row, e in enumerate(encodings):
            ids[row, :len(e.ids)] = e.ids
            mask[row, :len(e.ids)] = 1
        feed = {"input_ids": ids, "attention_mask": mask}
        if self._token_types:
            feed["token_type_ids"] = np.zeros_like(ids)
        return self.session.run([self.output], feed)[0]


def embed_passages(passages: Sequence[Passage], encoder: TextEncoder, *, batch_size: int = 32,
                   progress: bool = True) -> np.ndarray:
    """(n, dim) float32, through the engine's own TextEncoder, so passages and queries share one code path
    (`ragrt export` and `ragrt index add`)."""
    from tqdm import tqdm      # a dependency of tokenizers' huggingface_hub, so present in the runtime too
    vectors = np.empty((len(passages), encoder.dim), dtype=np.float32)
    row = 0
    with tqdm(total=len(passages), desc="embedding passages", unit="passage", disable=not progress) as bar:
        for batch in encoder.embed((passage_text(p) for p in passages), batch_size=batch_size, passages=True):
            vectors[row:row + len(batch)] = batch
            row += len(batch)
            bar.update(len(batch))
    return vectors
