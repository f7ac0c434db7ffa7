"""`ragrt data synth`: synthetic questions from a corpus without labels, to fine-tune on.

Two sources, each at most one question per passage:
- structure: a passage's own question sentences (an FAQ's "How do I ...?"), answered by the text
  that follows them; and a document's title or last heading turned into a question, answered by
  its first passage's opening;
- generator: the generator prompted to write one question about the passage (InPars, arXiv
  2202.05144), answered by the passage's sentences that best match it (the engine's extract mode).
Then the round trip (Promptagator, arXiv 2209.11755): a question is kept only if the encoder ranks
its own passage in the top `round_trip_k`; and duplicates (the same normalised question) go.
Each question names its passage's document as its positive, as the FAQ labels do.
"""
from __future__ import annotations

import json
import os
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ragrt.bundle.atomic import atomic_open, atomic_write_text
from ragrt.corpus.documents import chunk_documents, read_documents
from ragrt.errors import CorpusError, UserInputError
from ragrt.evaluate import is_relevant, normalize
from ragrt.extract import ExtractSettings, extract, split_sentences
from ragrt.retrieval.passages import Passage, document_of, passage_text

from ragrt.export.train.contrastive import embed, sample_pool
from ragrt.export.train.precision import autocast

SOURCES = ("structure", "generator")
MIN_PASSAGES = 20           # fewer gives too few questions, and too few negatives, to learn from
ANSWER_WORDS = 60           # as the FAQ answers (export/data/faq.py)
ASK = "Write one question that this passage answers.\n\n{passage}"
# Two worked examples as earlier chat turns (InPars prompts few-shot): SmolLM2-135M, asked
# without them, summarised the passage or rambled in most replies; with them it asks.
SHOTS = (("Lists\nThe list methods make it very easy to use a list as a stack, where the last element added is the "
          "first element retrieved. To add an item to the top of the stack, use append().",
          "How do I use a list as a stack?"),
         ("Files\nIt is good practice to use the with keyword when dealing with file objects. The advantage is "
          "that the file is properly closed after its suite finishes.",
          "Why should I open files with the with keyword?"))
PLAIN_ASK = "{ask}\n\nQuestion:\n"     # a base model's prompt: the question goes on the next line
# A question sentence of a passage: a capital opening, 3 to 30 words, ending at "?".
_QUESTION = re.compile(r"^[A-Z][^?]{8,}\?$")
_NUMBERING = re.compile(r"^[\d.]+\s+")           # "4.1. if Statements"


@dataclass(frozen=True)
class SynthConfig:
    corpus: Path
    out: Path
    encoder: Path               # HF checkpoint directories (export/models.py resolves names)
    generator: Path | None      # needed by the generator source only
    sources: tuple[str, ...] = SOURCES
    max_questions: int = 1000   # passages sampled to question, so a large corpus stays within budget
    round_trip_k: int = 3
    pool_size: int = 3000       # passages the round trip ranks among (the questioned ones always included)
    max_new_tokens: int = 32
    batch_size: int = 8
    seed: int = 0
    chunk_tokens: int = 128
    overlap: int = 32
    precision: str = "auto"     # of the generator's questions (export/train/precision.py)
    max_seconds: float = 0.0    # the generator asks no more passages after this long (0: no limit)


@dataclass(frozen=True)
class Synthetic:
    question: str
    answer: str
    passage: str                # the passage it was written from
    source: str


@dataclass
class SynthStats:
    passages: int = 0
    sampled: int = 0
    asked: int = 0              # passages the generator was asked about: fewer than sampled where time ran out
    candidates: dict[str, int] = field(default_factory=dict)
    round_trip: dict[str, int] = field(default_factory=dict)      # kept by the round trip
    kept: dict[str, int] = field(default_factory=dict)            # and after removing duplicates
    seconds: float = 0.0


def stats_path(out: Path) -> Path:
    return out.with_name(out.name + ".stats.json")


def replies_path(out: Path) -> Path:
    """The generator's replies so far, a line per passage: a rerun after an interruption goes on from them."""
    return out.with_name(out.name + ".replies.jsonl")


def read_replies(path: Path, generator: str) -> dict[str, str]:
    """{passage id: reply} of an earlier run with the same generator. Lines are appended as batches
    finish, so a run killed mid-write leaves at most a torn last line, which is asked again."""
    replies: dict[str, str] = {}
    if not path.exists():
        return replies
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("generator") == generator:
            replies[row["passage"]] = row["reply"]
    return replies


def load_passages(cfg: SynthConfig) -> list[Passage]:
    """The corpus chunked as export chunks it; refused when too small to learn from."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(Path(cfg.encoder) / "tokenizer.json"))
    passages = list(chunk_documents(read_documents(cfg.corpus), tok, max_tokens=cfg.chunk_tokens, overlap=cfg.overlap))
    require_enough(passages, cfg.corpus)
    return passages


def require_enough(passages: list[Passage], corpus: Path) -> None:
    if len(passages) < MIN_PASSAGES:
        raise CorpusError(f"{corpus}: {len(passages)} passages, too few to learn from without labels "
                          f"(at least {MIN_PASSAGES}); add documents, or give labelled pairs with --train")


def validate(cfg: SynthConfig) -> None:
    if cfg.max_questions < 1:
        raise UserInputError(f"--max-questions must be at least 1, got {cfg.max_questions}")
    if cfg.round_trip_k < 1:
        raise UserInputError(f"--round-trip-k must be at least 1, got {cfg.round_trip_k}")


def synthesize(cfg: SynthConfig, passages: list[Passage]) -> SynthStats:
    """Writes cfg.out (JSONL: question, answer, positive_ids, source, passage) and its stats beside it.
    `passages` are cfg.corpus's (`load_passages`)."""
    require_enough(passages, cfg.corpus)
    t0 = time.perf_counter()
    stats = SynthStats(passages=len(passages))
    rows = sorted(random.Random(cfg.seed).sample(range(len(passages)), min(cfg.max_questions, len(passages))))
    stats.sampled = len(rows)
    candidates = []
    if "structure" in cfg.sources:
        candidates += [q for r in rows for q in structure_questions(passages[r])]
    if "generator" in cfg.sources:
        with autocast(cfg.precision):
            found, stats.asked = generator_questions(cfg, [passages[r] for r in rows])
        candidates += found
    for s in cfg.sources:
        stats.candidates[s] = sum(q.source == s for q in candidates)
    kept = round_trip(cfg, candidates, passages, rows)
    stats.round_trip = {s: sum(q.source == s for q in kept) for s in cfg.sources}
    kept = dedupe(kept)
    stats.kept = {s: sum(q.source == s for q in kept) for s in cfg.sources}
    if not kept:
        raise CorpusError(f"{cfg.corpus}: no synthetic question survived the round trip "
                          f"({stats.candidates} candidates); try --source both or a larger --max-questions")
    with atomic_open(cfg.out) as f:
        for q in kept:
            f.write(json.dumps({"question": q.question, "answer": q.answer, "positive_ids": [document_of(q.passage)],
                                "source": q.source, "passage": q.passage}) + "\n")
    stats.seconds = round(time.perf_counter() - t0, 1)
    atomic_write_text(stats_path(cfg.out), json.dumps(asdict(stats), indent=2, sort_keys=True))
    replies_path(cfg.out).unlink(missing_ok=True)
    return stats


def opening(text: str, start: int = 0, words: int = ANSWER_WORDS) -> str:
    """Whole sentences of `text` from character `start` while they fit in `words` (the first one cut to fit)."""
    out: list[str] = []
    for a, b in split_sentences(text[start:]):
        sentence = text[start + a:start + b].split()
        if out and len(out) + len(sentence) > words:
            break
        out += sentence
    return " ".join(out[:words])


def structure_questions(p: Passage) -> list[Synthetic]:
    """The passage's own question sentences, then (for a document's first passage) its heading as a question."""
    found = []
    for a, b in split_sentences(p.text):
        sentence = " ".join(p.text[a:b].split())
        answer = opening(p.text, b)
        if _QUESTION.match(sentence) and 3 <= len(sentence.split()) <= 30 and answer:
            found.append(Synthetic(sentence, answer, p.id, "structure"))
    heading = _NUMBERING.sub("", p.title.split(" — ")[-1].strip())
    if heading and p.id.endswith("#0"):
        question = heading if heading.endswith("?") else f"What does the documentation say about {heading}?"
        found.append(Synthetic(question, opening(p.text), p.id, "structure"))
    return found


def question_prompt(tok, p: Passage) -> list[int]:
    """The generator's prompt asking for a question about `p`: the one it writes from and the teacher
    scores under. A base model (no chat template, as Gemma 3 270M) gets the same worked examples as
    plain text to continue; the question starts on a line of its own, so its tokens are the
    teacher's `tok.encode(question)` in either form."""
    if not tok.chat_template:
        shots = "".join(PLAIN_ASK.format(ask=ASK.format(passage=text)) + f"{q}\n\n" for text, q in SHOTS)
        return tok(shots + PLAIN_ASK.format(ask=ASK.format(passage=passage_text(p)))).input_ids
    turns = [turn for text, question in SHOTS for turn in ({"role": "user", "content": ASK.format(passage=text)},
                                                           {"role": "assistant", "content": question})]
    turns.append({"role": "user", "content": ASK.format(passage=passage_text(p))})
    return tok.apply_chat_template(turns, add_generation_prompt=True, tokenize=True)


def clean_question(text: str) -> str | None:
    """The generated reply up to its first "?" on one line, or None when that is no short question."""
    if "?" not in text:
        return None
    line = " ".join(text[:text.index("?") + 1].split()).removeprefix("Question:").strip().strip('"')
    return line if 3 <= len(line.split()) <= 30 else None


class SharedPrefix:
    """The opening every question prompt shares (system prompt, worked examples, the ask), run once
    and lent to each batch as its past: about half of every prompt's tokens."""

    def __init__(self, model):
        self.model = model
        self._past: dict[tuple[int, ...], object] = {}

    @staticmethod
    def split(prompts: list[list[int]]) -> tuple[tuple[int, ...], list[list[int]]]:
        """(the prompts' common prefix, each one's rest), every rest at least one token long."""
        n = min(len(os.path.commonprefix(prompts)), min(map(len, prompts)) - 1)
        return tuple(prompts[0][:n]), [x[n:] for x in prompts]

    def past(self, prefix: tuple[int, ...], rows: int):
        """A fresh cache of `prefix` for `rows` rows (the model appends to it), or None for no prefix."""
        import copy
        import torch
        if not prefix:
            return None
        if prefix not in self._past:
            with torch.no_grad():
                self._past = {prefix: self.model(torch.tensor([prefix]), use_cache=True).past_key_values}
        past = copy.deepcopy(self._past[prefix])
        past.batch_repeat_interleave(rows)
        return past


def generator_questions(cfg: SynthConfig, passages: Sequence[Passage]) -> tuple[list[Synthetic], int]:
    """(questions, passages asked): one greedy question per passage, in batches after the shared
    prefix (each row's rest padded on its left, so every row ends where it generates). Replies are
    kept beside cfg.out as they come (`replies_path`), so a rerun asks only the passages not yet
    asked. Passages are asked in a seeded order, so one that `max_seconds` cuts short has asked a uniform sample."""
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer
    journal, generator = replies_path(cfg.out), str(Path(cfg.generator).resolve())
    replies = read_replies(journal, generator)
    todo = [p for p in passages if p.id not in replies]
    random.Random(cfg.seed).shuffle(todo)
    deadline = time.monotonic() + cfg.max_seconds if cfg.max_seconds else float("inf")
    if todo:
        journal.parent.mkdir(parents=True, exist_ok=True)
        tok = AutoTokenizer.from_pretrained(cfg.generator)
        model = AutoModelForCausalLM.from_pretrained(cfg.generator, dtype=torch.float32).eval()
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        shared = SharedPrefix(model)
        with tqdm(total=len(passages), initial=len(passages) - len(todo), desc="questions", unit="passage") as bar, \
                journal.open("a", encoding="utf-8") as f, torch.no_grad():
            if not journal.read_bytes().endswith(b"\n") and journal.stat().st_size:
                f.write("\n")                      # after a torn line, not onto it
            for i in range(0, len(todo), cfg.batch_size):
                if time.monotonic() > deadline:
                    break
                batch = todo[i:i + cfg.batch_size]
                prefix, rests = shared.split([question_prompt(tok, p) for p in batch])
                n, width = len(prefix), max(map(len, rests))
                ids = torch.tensor([[*prefix, *[pad] * (width - len(x)), *x] for x in rests])
                mask = torch.tensor([[1] * n + [0] * (width - len(x)) + [1] * len(x) for x in rests])
                out = model.generate(input_ids=ids, attention_mask=mask, past_key_values=shared.past(prefix, len(batch)),
                                     max_new_tokens=cfg.max_new_tokens, do_sample=False, pad_token_id=pad)
                for p, reply in zip(batch, tok.batch_decode(out[:, n + width:], skip_special_tokens=True)):
                    replies[p.id] = reply
                    f.write(json.dumps({"generator": generator, "passage": p.id, "reply": reply}) + "\n")
                f.flush()
                bar.update(len(batch))
    settings = ExtractSettings(words=ANSWER_WORDS, position=0.0, opening=0.0)   # the best match, wherever it is
    found, asked = [], [p for p in passages if p.id in replies]
    for p in asked:
        question = clean_question(replies[p.id])
        if question:
            answer = " ".join(extract(question, [p], [1.0], settings).split())      # one line to read and edit
            found.append(Synthetic(question, answer, p.id, "generator"))
    return found, len(asked)


def round_trip(cfg: SynthConfig, questions: list[Synthetic], passages: list[Passage], rows: list[int]) -> list[Synthetic]:
    """The questions whose own document has a passage in the encoder's top `round_trip_k`, among
    the questioned passages and a seeded sample of the others."""
    from transformers import AutoModel, AutoTokenizer
    if not questions:
        return []
    model, tok = AutoModel.from_pretrained(cfg.encoder).eval(), AutoTokenizer.from_pretrained(cfg.encoder)
    pool = sample_pool(cfg.pool_size, len(passages), [set(rows)], cfg.seed)
    pool_vecs = embed_all(model, tok, [passage_text(passages[r]) for r in pool], "round trip: passages")
    query_vecs = embed_all(model, tok, [q.question for q in questions], "round trip: questions")
    return [q for q, top in zip(questions, top_rows(query_vecs, pool_vecs, cfg.round_trip_k))
            if any(is_relevant(passages[pool[j]].id, (document_of(q.passage),)) for j in top)]


def top_rows(query_vecs: np.ndarray, pool_vecs: np.ndarray, k: int) -> np.ndarray:
    """Each query's k best pool rows (n, k), ties broken by row."""
    return np.argsort(-(query_vecs @ pool_vecs.T), axis=1, kind="stable")[:, :k]


def embed_all(model, tok, texts: list[str], desc: str, batch: int = 64) -> np.ndarray:
    from tqdm import tqdm
    return np.concatenate([embed(model, tok, texts[i:i + batch]).numpy()
                           for i in tqdm(range(0, len(texts), batch), desc=desc, unit="batch")])


def dedupe(questions: list[Synthetic]) -> list[Synthetic]:
    """The first of each normalised question, and the first question of each passage from each source."""
    seen_text, seen_passage, out = set(), set(), []
    for q in questions:
        key = normalize(q.question)
        if key in seen_text or (q.passage, q.source) in seen_passage:
            continue
        seen_text.add(key)
        seen_passage.add((q.passage, q.source))
        out.append(q)
    return out


def question_logprobs(model, tok, pairs: Sequence[tuple[str, Passage]], batch: int = 8) -> list[float]:
    """log P(question | passage) under `question_prompt`, summed over the question's tokens, teacher-forced.
    Negatives are compared with their question's positive, the same question: the sum ranks as the mean."""
    import torch
    from ragrt.export.train.sft import IGNORE, sequence_logprobs
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    from tqdm import tqdm
    shared = SharedPrefix(model)
    out: list[float] = []
    with torch.no_grad():
        for i in tqdm(range(0, len(pairs), batch), desc="teacher", unit="batch"):
            chunk = pairs[i:i + batch]
            prefix, rests = shared.split([question_prompt(tok, p) for _, p in chunk])
            examples = []
            for rest, (question, _) in zip(rests, chunk):
                q = tok.encode(question, add_special_tokens=False)
                examples.append((rest + q, [IGNORE] * len(rest) + q))
            out += sequence_logprobs(model, examples, pad, past=shared.past(prefix, len(chunk))).tolist()
    return out
