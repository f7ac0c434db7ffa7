"""Writing a bundle: the prompt spec, the manifest with checksums, and the atomic rename."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Iterator

from ragrt.bundle.atomic import atomic_write_text
from ragrt.bundle.versions import CORPUS_DIR
from ragrt.bundle.integrity import file_entries
from ragrt.errors import UserInputError
from ragrt.decoding.sampling import DecodingDefaults
from ragrt.bundle.manifest import MANIFEST_NAME, FileEntry, Manifest, PromptSpec, TaskPrompt

SYSTEM_PROMPT = ("You are a helpful assistant. Answer the question using the context passages. "
                 "Answer briefly and precisely.")
USER_TEMPLATE = "Context:\n{context}\n\nQuestion: {question}"
# Rank-free, so a passage's KV is the same whatever its rank (decoding/blocks.py): numbered
# passages also had the model continue the list ("[6] ...") instead of answering.
PASSAGE_TEMPLATE = "{title}\n{text}"
# Chosen on the FAQ dev split (benchmarks/answer_defaults.py, figures in benchmarks/README.md):
# greedy answers of the small generators loop; these two stop it and raised F1.
DECODING = DecodingDefaults(repetition_penalty=1.2, no_repeat_ngram_size=4)
# `ragrt export --dev` scores these on the dev questions and keeps the best F1 whose answers
# loop at most LOOP_LIMIT of the time (a fine-tuned generator may not need the penalty).
DECODING_CANDIDATES = {"repetition_penalty=1.2,no_repeat_ngram_size=4": DECODING,
                       "no_repeat_ngram_size=4": DecodingDefaults(no_repeat_ngram_size=4),
                       "greedy": DecodingDefaults()}
LOOP_LIMIT = 0.05
# Tasks beyond question answering; `ragrt ask --task NAME` and the server's "task" pick one.
TASKS = {
    "summarize": TaskPrompt(
        system="You are a helpful assistant. Summarize what the context passages say about the topic, "
               "in a few sentences, using only the passages.",
        user="Context:\n{context}\n\nTopic: {question}\n\nSummary:"),
}
_SENTINEL_SYSTEM = "\x00SYSTEM\x00"
_SENTINEL_USER = "\x00USER\x00"


def prompt_spec(chat_template: str | None, render) -> PromptSpec:
    """Renders the model's Jinja chat template once, with sentinels, into a `{system}`/`{user}`
    template, so the engine builds prompts by plain substitution and needs no Jinja.

    `render(messages) -> str` applies the chat template with the generation prompt added.
    """
    if chat_template:
        text = render([{"role": "system", "content": _SENTINEL_SYSTEM},
                       {"role": "user", "content": _SENTINEL_USER}])
        if _SENTINEL_SYSTEM not in text or _SENTINEL_USER not in text:
            raise UserInputError("the generator's chat template drops the system or user message")
        chat = text.replace(_SENTINEL_SYSTEM, "{system}").replace(_SENTINEL_USER, "{user}")
    else:
        chat = "{system}\n\n{user}\n\nAnswer:"
    return templates(chat)


def templates(chat: str) -> PromptSpec:
    """ragrt's templates around the model's rendered chat template. A bundle gets them when it is
    written, not from the cached model export, so a template change reaches the next export."""
    return PromptSpec(chat=chat, system=SYSTEM_PROMPT, user=USER_TEMPLATE, passage=PASSAGE_TEMPLATE,
                      tasks=dict(TASKS))


def library_versions() -> dict[str, str]:
    names = ["ragrt", "numpy", "tokenizers", "usearch", "onnxruntime", "onnx", "torch", "transformers",
             "optimum", "optimum-onnx"]
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def model_file_entries(root: Path) -> dict[str, FileEntry]:
    """The manifest's files: everything but itself and the corpus, whose generations list their own."""
    return file_entries(root, [p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST_NAME
                               and p.relative_to(root).parts[0] != CORPUS_DIR])


def now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def write_manifest(root: Path, manifest: Manifest) -> None:
    atomic_write_text(root / MANIFEST_NAME, manifest.to_json())


@contextmanager
def staging_dir(out: Path, *, force: bool) -> Iterator[Path]:
    """Yields a temp dir beside `out`; on success it replaces `out` by rename, else it is removed.

    Nobody ever sees a half-written bundle at `out`: either the old one or the new one.
    """
    out = Path(out)
    if out.exists() and not force:
        raise UserInputError(f"{out} already exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
