"""`ragrt finetune`: adapt the retriever and the generator to the user's corpus and Q/A pairs.

Phases, each resumable from its last checkpoint:
1. retriever: contrastive training of the encoder, in-batch negatives plus hard negatives
   mined with the current encoder at the start of every epoch;
2. generator: supervised fine-tuning on the prompt the engine really builds (retrieved
   passages + question -> answer), loss on answer tokens only; full or LoRA (merged);
   with `joint`, instead the RAG marginal likelihood sum_c P(c|q) P(a|q,c) over the top-k,
   so the query encoder also learns from the generator (passage vectors stay frozen);
   with `block_attention`, on prompts read from passage KV as the engine reads them (each
   passage run after the prefix alone, then turned to its place; Block-Attention, arXiv
   2409.15355; sft.block_logits), a seeded share `block_attention_mix` of each epoch on the
   plain prompt, so the generator reads prompts assembled from reused passage KV and full
   prefill alike.
RUN/encoder and RUN/generator are HF checkpoints that `ragrt export` takes as they are.
Dropout stays off, so a resumed run ends bit-identical to an uninterrupted one. A wall-time
budget (`max_minutes`) ends a phase early, after the last step that fits; what is left goes to the next.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path

import numpy as np

from ragrt.bundle.atomic import atomic_write_text
from ragrt.corpus.documents import chunk_documents, read_documents
from ragrt.errors import CorpusError, UserInputError
from ragrt.options import PASSAGE_KV_REPAIR
from ragrt.evaluate import QA, is_relevant, read_qa, token_f1
from ragrt.decoding.prompt import PromptBuilder
from ragrt.retrieval.passages import Passage, passage_text

from ragrt.export.data.synth import SOURCES, SynthConfig, question_logprobs, require_enough, synthesize
from ragrt.export.train.precision import PRECISIONS, autocast, resolve
from ragrt.export.train.contrastive import bm25_negatives, contrastive_loss, embed, mine_hard_negatives, sample_pool
from ragrt.export.models import checkpoint_name, encoder_checkpoint, generator_checkpoint
from ragrt.export.pack import prompt_spec
from ragrt.export.train.sft import (answer_loss, block_example, block_loss, rag_marginal_nll, sequence_logprobs,
                                   sft_example)

TRAINING_RECORD = "ragrt-training.json"     # in the saved generator: how it was trained, for the export


@dataclass(frozen=True)
class FinetuneConfig:
    corpus: Path
    train: Path | None              # labelled Q/A pairs; None: synthetic questions alone
    out: Path
    dev: Path | None = None
    encoder: Path | None = None
    generator: Path | None = None
    epochs: int = 3                 # retriever epochs
    # Three epochs over prompts of the engine's k passages: measured against one over three
    # passages in benchmarks/README.md (Transfer learning).
    generator_epochs: int = 3
    lr: float = 3e-5
    generator_lr: float = 3e-5
    batch_size: int = 16
    hard_negatives: int = 2
    bm25_negatives: int | None = None   # per question, besides; None: 1 on synthetic questions
    pool_size: int = 3000           # passages embedded per epoch to mine negatives from
    k: int = 5                      # passages in a generator training prompt
    max_answer_tokens: int = 64
    grad_accumulation: int = 4
    lora: bool = False
    joint: bool = False
    block_attention: bool | None = None     # None: on when training on synthetic questions alone
    block_attention_mix: float = 0.5    # share of each epoch's generator examples under the causal mask
    temperature: float = 0.05
    seed: int = 0
    checkpoint_every: int = 20
    max_steps: int = 0              # per phase; 0 = no limit (CI uses a few)
    chunk_tokens: int = 128
    overlap: int = 32
    # Synthetic questions (export/data/synth.py): always without `train`, with it when `synthetic`.
    # Beside labels they train the retriever first, for SYNTHETIC_EPOCHS, and the generator not at all.
    synthetic: bool = False
    max_questions: int = 1000
    synth_sources: tuple[str, ...] = SOURCES
    round_trip_k: int = 3
    # Drop mined negatives the generator finds as likely as the positive to prompt the question
    # (they likely answer it too). None: on for synthetic questions.
    teacher: bool | None = None
    # Wall time of the whole run, synthesis included. None: 30 on synthetic questions alone (an
    # unlabelled corpus adapts within half an hour; benchmarks/README.md), no limit otherwise; 0: no limit.
    max_minutes: float | None = None
    precision: str = "auto"         # precision.py: bf16 autocast where the CPU has bf16 units

    @property
    def uses_synthetic(self) -> bool:
        return self.train is None or self.synthetic


@dataclass
class RunState:
    phase: str = "retriever"        # [synthetic ->] retriever -> generator -> done
    epoch: int = 0
    step: int = 0                   # optimizer steps taken in this phase
    losses: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)      # phase seconds, dev recall before/after, budget
    seconds: float = 0.0            # wall time spent on the run by earlier processes, as of their last checkpoint


# Beside labels, synthetic questions go first, one retriever epoch, then the labels' epochs: on the
# FAQ split this beat labels alone on recall@5, where mixing both (at any weight tried) lost, and
# the generator scored lower on test with them in any mix (benchmarks/README.md, sessions 21-22).
SYNTHETIC_EPOCHS = 1

FINISH_SECONDS = 15.0      # of the budget, kept for what is not timed: starting Python, writing the models


class Budget:
    """The run's wall time left (`max_minutes`), counted across resumes from `RunState.seconds`."""

    def __init__(self, minutes: float, spent_before: float, clock=time.monotonic):
        self.limit = max(minutes * 60 - FINISH_SECONDS, 0.0) if minutes else float("inf")
        self.spent_before, self.clock, self.started = spent_before, clock, clock()

    def spent(self) -> float:
        return self.spent_before + self.clock() - self.started

    def left(self) -> float:
        return self.limit - self.spent()


def save_state(path: Path, state: RunState, budget: Budget) -> None:
    """state.json, with the run's wall time spent as of now, for a resumed run's budget."""
    state.seconds = round(budget.spent(), 1)
    _write_json(path, asdict(state))


def _say(msg: str) -> None:
    print(f"[ragrt finetune] {msg}", flush=True)


def _write_json(path: Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True))


def _validate(cfg: FinetuneConfig) -> None:
    for name in ("epochs", "generator_epochs", "batch_size", "k", "grad_accumulation", "checkpoint_every"):
        if getattr(cfg, name) < (0 if name.endswith("epochs") else 1):
            raise UserInputError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if not cfg.lr > 0 or not cfg.generator_lr > 0:
        raise UserInputError("learning rates must be > 0")
    if not 0 <= cfg.block_attention_mix <= 1:
        raise UserInputError(f"--block-attention-mix is a share between 0 and 1, got {cfg.block_attention_mix}")
    if cfg.max_minutes is not None and not cfg.max_minutes >= 0:
        raise UserInputError(f"--max-minutes must be 0 (no limit) or more, got {cfg.max_minutes}")
    if cfg.precision not in PRECISIONS:
        raise UserInputError(f"--precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
    for name in ("max_questions", "round_trip_k"):
        if cfg.uses_synthetic and getattr(cfg, name) < 1:
            raise UserInputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if cfg.block_attention and cfg.joint:
        raise UserInputError("--block-attention does not combine with --joint (its prompts hold one passage each, "
                             "where block attention is causal attention): drop one of them")


def training_record(checkpoint: Path) -> dict:
    """How `ragrt finetune` trained this generator ({} for a checkpoint it did not write)."""
    path = Path(checkpoint) / TRAINING_RECORD
    return json.loads(path.read_text()) if path.is_file() else {}


def _resolved(cfg: FinetuneConfig, gen_ckpt: Path) -> FinetuneConfig:
    """The defaults that depend on the data and the machine: block attention when synthetic questions
    are all there is (their answers come from the passage, so the generator learns to read), the
    teacher and BM25 negatives when they are what the retriever trains on (no one checked that their
    negatives do not answer them; `synthetic_warmup` for their epoch before labels), the 30-minute
    budget without labels, and the precision this CPU computes fastest."""
    supported = generator_builder(cfg, gen_ckpt)[1].blocks_supported
    blocks = cfg.block_attention
    if blocks and not supported:
        raise UserInputError("--block-attention: this ragrt's passage template numbers passages, so the engine "
                             "cannot reuse passage KV; train without --block-attention")
    if blocks is None:
        blocks = cfg.train is None and not cfg.joint
        if blocks and not supported:
            _say("warning: the passage template numbers passages, so block attention is off")
            blocks = False
    teacher = cfg.train is None if cfg.teacher is None else cfg.teacher
    bm25 = int(cfg.train is None) if cfg.bm25_negatives is None else cfg.bm25_negatives
    minutes = (30.0 if cfg.train is None else 0.0) if cfg.max_minutes is None else cfg.max_minutes
    return replace(cfg, block_attention=blocks, teacher=teacher, bm25_negatives=bm25, max_minutes=minutes,
                   precision=resolve(cfg.precision))


def synthetic_warmup(given: FinetuneConfig, resolved: FinetuneConfig) -> FinetuneConfig:
    """The retriever's pass over synthetic questions before the labelled ones: `resolved`, for
    SYNTHETIC_EPOCHS, with the teacher and BM25 negatives on unless `given` says otherwise."""
    return replace(resolved, epochs=SYNTHETIC_EPOCHS if resolved.epochs else 0,
                   teacher=True if given.teacher is None else given.teacher,
                   bm25_negatives=1 if given.bm25_negatives is None else given.bm25_negatives)


def load_passages(cfg: FinetuneConfig, chunk_tokenizer) -> list[Passage]:
    """Passages chunked exactly as `ragrt export` chunks them; enough of them to learn from without labels."""
    passages = list(chunk_documents(read_documents(cfg.corpus), chunk_tokenizer, max_tokens=cfg.chunk_tokens,
                                    overlap=cfg.overlap))
    if cfg.uses_synthetic:
        require_enough(passages, cfg.corpus)
    return passages


def synthetic_questions(cfg: FinetuneConfig, run: Path, budget: Budget, enc_ckpt: Path, gen_ckpt: Path,
                        passages: list[Passage]) -> Path:
    """RUN/synthetic.jsonl, written once: a rerun trains on the same questions (edit it and rerun to
    change them). The generator asks questions for at most half the time left, so training has the rest."""
    path = run / "synthetic.jsonl"
    if path.exists():
        _say(f"reusing the synthetic questions of {path}")
        return path
    stats = synthesize(SynthConfig(corpus=cfg.corpus, out=path, encoder=enc_ckpt, generator=gen_ckpt,
                                   sources=cfg.synth_sources, max_questions=cfg.max_questions,
                                   round_trip_k=cfg.round_trip_k, seed=cfg.seed, chunk_tokens=cfg.chunk_tokens,
                                   overlap=cfg.overlap, precision=cfg.precision,
                                   max_seconds=max(budget.left() / 2, 1.0) if budget.limit < float("inf") else 0.0),
                       passages)
    if "generator" in cfg.synth_sources and stats.asked < stats.sampled:
        _say(f"half the budget (--max-minutes {cfg.max_minutes:g}) went to the generator's questions: it asked "
             f"{stats.asked} of {stats.sampled} sampled passages")
    _say(f"synthetic questions: {stats.candidates} candidates, {stats.round_trip} after the round trip, "
         f"{stats.kept} kept, in {path} ({stats.seconds:.0f} s)")
    return path


def load_data(cfg: FinetuneConfig, train_files: list[Path], passages: list[Passage]
              ) -> tuple[list[QA], list[set[int]], list[set[int]]]:
    """Q/A pairs of `train_files`, each pair's positive rows among `passages`, and its anchors: the
    passage a synthetic question was written from where known, else its positives. A label names a
    document, whose other passages must not be pushed away as negatives; but the question was written
    from one passage and its answer taken from it, so that one is what the retriever pulls close, the
    teacher scores negatives against, and the generator's prompt holds."""
    items = [qa for path in train_files for qa in read_qa(path)]
    row_of = {p.id: i for i, p in enumerate(passages)}
    mined = 0
    positives = []
    for qa in items:
        if qa.positive_ids:
            rows = {i for i, p in enumerate(passages) if is_relevant(p.id, qa.positive_ids)}
        else:
            # No gold ids: the passage that shares the most words with the answer.
            rows = {int(np.argmax([token_f1(p.text, qa.answer) for p in passages]))}
            mined += 1
        positives.append(rows)
    if mined:
        _say(f"{mined} of {len(items)} questions have no positive_ids: mined their positive as the passage "
             "with the highest token F1 against the answer")
    anchors = [{row_of[qa.passage]} if row_of.get(qa.passage) in rows else rows for qa, rows in zip(items, positives)]
    keep = [i for i, rows in enumerate(positives) if rows]
    if len(keep) < len(items):
        _say(f"skipping {len(items) - len(keep)} questions whose positive_ids match no passage of the corpus")
    if not keep:
        raise CorpusError(f"{', '.join(map(str, train_files))}: no question has a positive passage in {cfg.corpus}")
    return [items[i] for i in keep], [positives[i] for i in keep], [anchors[i] for i in keep]


class Trainer:
    """One phase's optimizer with checkpoints that hold weights, optimizer moments and the step."""

    def __init__(self, run: Path, state: RunState, models: dict, lr: float, cfg: FinetuneConfig, budget: Budget):
        import torch
        self.run, self.state, self.models, self.cfg, self.budget = run, state, models, cfg, budget
        params = [p for m in models.values() for p in m.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
        self._restore_optimizer()
        self.bar, self.planned, self.timed = None, 0, []

    def progress(self, total: int, desc: str) -> None:
        from tqdm import tqdm
        self.planned = total
        self.bar = tqdm(total=total, desc=desc, unit="step", initial=self.state.step)
        self.last = self.budget.clock()

    def _step_seconds(self) -> float:
        """A step's expected wall time: the median of this process's steps (0 before the first)."""
        return float(np.median(self.timed)) if self.timed else 0.0

    def _opt_path(self) -> Path:
        return self.run / "checkpoint" / f"optimizer-{self.state.phase}.safetensors"

    def _restore_optimizer(self) -> None:
        from safetensors.torch import load_file
        path = self._opt_path()
        if not path.exists():
            return
        tensors = load_file(str(path))
        sd = self.optimizer.state_dict()
        sd["state"] = {}
        for key, value in tensors.items():
            idx, name = key.split(".", 1)
            sd["state"].setdefault(int(idx), {})[name] = value
        self.optimizer.load_state_dict(sd)

    def step(self, loss_value: float) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.state.step += 1
        self.state.losses.setdefault(self.state.phase, []).append(round(loss_value, 5))
        now = self.budget.clock()
        self.timed.append(now - self.last)
        self.last = now
        if self.bar is not None:
            if self.budget.limit < float("inf"):       # the bar's total and ETA end where the budget does
                fit = self.state.step + int(self.budget.left() // max(self._step_seconds(), 1e-6))
                self.bar.total = max(self.state.step, min(self.planned, fit))
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss_value:.3f}")
        if self.state.step % self.cfg.checkpoint_every == 0:
            self.checkpoint()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.out_of_time():
            self.state.report.setdefault("budget_stopped", {})[self.state.phase] = [self.state.step, self.planned]
            _say(f"the {self.cfg.max_minutes:g}-minute budget (--max-minutes) ended the {self.state.phase} after "
                 f"{self.state.step} of {self.planned} steps")
        self.checkpoint()

    def checkpoint(self) -> None:
        """Weights and optimizer first, state.json last: a crash in between resumes from the older state."""
        from safetensors.torch import save_file
        ck = self.run / "checkpoint"
        ck.mkdir(parents=True, exist_ok=True)
        for name, model in self.models.items():
            tmp = ck / f".{name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp, safe_serialization=True)
            shutil.rmtree(ck / name, ignore_errors=True)
            os.replace(tmp, ck / name)
        flat = {f"{idx}.{k}": v.contiguous() for idx, s in self.optimizer.state_dict()["state"].items()
                for k, v in s.items()}
        save_file(flat, str(ck / ".optimizer.tmp"))
        os.replace(ck / ".optimizer.tmp", self._opt_path())
        save_state(self.run / "state.json", self.state, self.budget)

    def out_of_time(self) -> bool:
        """The next step would end past the budget."""
        return self.state.step < self.planned and self.budget.left() < self._step_seconds()

    def done(self) -> bool:
        return (bool(self.cfg.max_steps) and self.state.step >= self.cfg.max_steps) or self.out_of_time()


class Teacher:
    """Scores hard negatives with the generator's log P(question | passage) (GPL, arXiv 2112.07577,
    pseudo-labels with a cross-encoder to the same end): a mined negative the generator finds at
    least as likely to have prompted the question as its positive likely answers it too, and
    training would push a right passage away. Scores are kept across epochs: pairs recur."""

    def __init__(self, checkpoint: Path, items: list[QA], passages: list[Passage], anchors: list[set[int]]):
        self.checkpoint, self.items, self.passages, self.anchors = checkpoint, items, passages, anchors
        self.scores: dict[tuple[int, int], float] = {}

    @cached_property
    def loaded(self):
        """(model, tokenizer), loaded on first use: a run resumed past its mining never needs them."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        return (AutoModelForCausalLM.from_pretrained(self.checkpoint, dtype=torch.float32).eval(),
                AutoTokenizer.from_pretrained(self.checkpoint))

    def keep(self, negatives: list[list[int]], pool: list[int]) -> tuple[list[list[int]], int]:
        """(`negatives` (pool indices) without the ones that score at least their best anchor, how many went)."""
        pairs = {(i, r) for i, rows in enumerate(self.anchors) for r in rows}
        pairs |= {(i, pool[j]) for i, negs in enumerate(negatives) for j in negs}
        todo = sorted(pairs - self.scores.keys())
        scored = question_logprobs(*self.loaded, [(self.items[i].question, self.passages[r]) for i, r in todo])
        self.scores.update(zip(todo, scored))
        kept = [[j for j in negs if self.scores[i, pool[j]] < max(self.scores[i, r] for r in self.anchors[i])]
                for i, negs in enumerate(negatives)]
        return kept, sum(map(len, negatives)) - sum(map(len, kept))


def train_retriever(cfg, run, state, budget, items, passages, positives, anchors, enc_ckpt, gen_ckpt,
                    dev: list[QA] | None):
    from transformers import AutoModel, AutoTokenizer
    resume = run / "checkpoint" / "encoder"
    model = AutoModel.from_pretrained(resume if resume.is_dir() else enc_ckpt)
    model.eval()                       # no dropout: determinism, and resume == uninterrupted
    tok = AutoTokenizer.from_pretrained(enc_ckpt)
    trainer = Trainer(run, state, {"encoder": model}, cfg.lr, cfg, budget)
    pool = sample_pool(cfg.pool_size, len(passages), positives, cfg.seed)
    pool_index = {row: j for j, row in enumerate(pool)}
    texts = [passage_text(passages[r]) for r in pool]
    steps_per_epoch = -(-len(items) // cfg.batch_size)
    teacher = Teacher(gen_ckpt, items, passages, anchors) if cfg.teacher else None
    pool_positives = [{pool_index[r] for r in rows} for rows in positives]
    # BM25 does not change as the encoder learns: its negatives are mined once, added to each epoch's.
    lexical = bm25_negatives([qa.question for qa in items], texts, pool_positives, cfg.bm25_negatives) \
        if cfg.bm25_negatives else [[] for _ in items]
    warmup = state.phase == "synthetic"
    trainer.progress(steps_per_epoch * cfg.epochs, "retriever" + (" (synthetic questions)" if warmup else ""))
    # Each phase has its own pool, so its own figures: the warm-up's are reported apart.
    before, after = (("synthetic_" if warmup else "") + f"dev_recall@5_{w}" for w in ("before", "after"))
    while state.epoch < cfg.epochs and not trainer.done():
        # Mined once per epoch and kept, so a run resumed mid-epoch trains on the same negatives.
        mined = run / "checkpoint" / f"negatives-{state.phase}-{state.epoch}.json"
        if mined.exists():
            negatives = json.loads(mined.read_text())
        else:
            with autocast(cfg.precision):
                pool_vecs = np.concatenate([embed(model, tok, texts[i:i + 64]).numpy() for i in range(0, len(texts), 64)])
                query_vecs = embed(model, tok, [qa.question for qa in items]).numpy()
            dense = mine_hard_negatives(query_vecs, pool_vecs, pool_positives, cfg.hard_negatives)
            negatives = [d + [j for j in lex if j not in d] for d, lex in zip(dense, lexical)]
            if teacher is not None:
                with autocast(cfg.precision):
                    negatives, dropped = teacher.keep(negatives, pool)
                state.report.setdefault("teacher_dropped", {})[("synthetic-" if warmup else "") + str(state.epoch)] = dropped
                _say(f"the teacher dropped {dropped} of {dropped + sum(map(len, negatives))} hard negatives "
                     "as likely to answer their question as its positive")
            mined.parent.mkdir(parents=True, exist_ok=True)
            _write_json(mined, negatives)
        if state.epoch == 0 and dev is not None and before not in state.report:
            state.report[before] = dev_recall(model, tok, dev, pool, passages)
        order = list(range(len(items)))
        random.Random(cfg.seed * 1000 + state.epoch).shuffle(order)
        for b in range(state.step - state.epoch * steps_per_epoch, steps_per_epoch):
            batch = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            pick = random.Random(cfg.seed + 7919 * (state.epoch * steps_per_epoch + b))
            pos_texts = [passage_text(passages[pick.choice(sorted(anchors[i]))]) for i in batch]
            neg_texts = [texts[j] for i in batch for j in negatives[i]]
            # An autocast per step: its cache of bf16 weights would go stale once the optimizer steps.
            with autocast(cfg.precision):
                q = embed(model, tok, [items[i].question for i in batch], grad=True)
                p = embed(model, tok, pos_texts, grad=True)
                n = embed(model, tok, neg_texts, grad=True) if neg_texts else None
                loss = contrastive_loss(q, p, n)
            loss.backward()
            trainer.step(loss.item())
            if trainer.done():
                break
        else:
            state.epoch += 1
    if dev is not None:
        state.report[after] = dev_recall(model, tok, dev, pool, passages)
        _say(f"dev recall@5 within a pool of {len(pool)} passages: "
             f"{state.report.get(before, float('nan')):.3f} -> {state.report[after]:.3f}")
    trainer.close()
    return model, tok


def dev_recall(model, tok, dev: list[QA], pool: list[int], passages: list[Passage]) -> float:
    """recall@5 of held-out questions, searching the training pool plus their own positives."""
    rows = sorted(set(pool) | {i for i, p in enumerate(passages) if any(is_relevant(p.id, qa.positive_ids) for qa in dev)})
    vecs = np.concatenate([embed(model, tok, [passage_text(passages[r]) for r in rows[i:i + 64]]).numpy()
                           for i in range(0, len(rows), 64)])
    queries = embed(model, tok, [qa.question for qa in dev]).numpy()
    hits = [any(is_relevant(passages[rows[j]].id, qa.positive_ids) for j in np.argsort(-vecs @ q)[:5])
            for q, qa in zip(queries, dev)]
    return round(float(np.mean(hits)), 4)


def generator_contexts(cfg, run, items, passages, anchors, encoder, enc_tok):
    """Per question: the top-k passages by the (fine-tuned) encoder over a pool, an anchor
    always among them, in score order as the engine would give them; and the frozen passage
    vectors joint training scores them with. Saved, so a resumed run sees the same ones."""
    ck = run / "checkpoint"
    if (ck / "contexts.json").exists():
        saved = json.loads((ck / "contexts.json").read_text())
        return saved["contexts"], dict(zip(saved["rows"], np.load(ck / "frozen.npy", allow_pickle=False)))
    pool = sample_pool(cfg.pool_size, len(passages), anchors, cfg.seed + 1)
    pool_vecs = np.concatenate([embed(encoder, enc_tok, [passage_text(passages[r]) for r in pool[i:i + 64]]).numpy()
                                for i in range(0, len(pool), 64)])
    query_vecs = embed(encoder, enc_tok, [qa.question for qa in items]).numpy()
    contexts = []
    for qv, rows in zip(query_vecs, anchors):
        scores = pool_vecs @ qv
        top = [pool[j] for j in np.argsort(-scores, kind="stable")[:cfg.k]]
        if not rows & set(top):
            top[-1] = max(rows, key=lambda r: scores[pool.index(r)])
        contexts.append(top)
    rows = sorted({r for ctx in contexts for r in ctx})
    frozen = np.stack([pool_vecs[pool.index(r)] for r in rows])
    ck.mkdir(parents=True, exist_ok=True)
    np.save(ck / "frozen.npy", frozen, allow_pickle=False)
    _write_json(ck / "contexts.json", {"contexts": contexts, "rows": rows})
    return contexts, dict(zip(rows, frozen))


def generator_examples(cfg, items, passages, contexts, builder, eos_id, make=sft_example):
    def passages_at(rows):
        return [passages[r] for r in rows]
    if cfg.joint:       # one prompt per passage: the marginal needs p(a | q, c) for each c
        return [[make(builder, qa.question, passages_at([r]), qa.answer, eos_id, cfg.max_answer_tokens)
                 for r in ctx]
                for qa, ctx in zip(items, contexts)]
    return [make(builder, qa.question, passages_at(ctx), qa.answer, eos_id, cfg.max_answer_tokens)
            for qa, ctx in zip(items, contexts)]


def generator_builder(cfg, gen_ckpt):
    """The HF tokenizer and the engine's prompt builder for this generator, as the export will write it."""
    from transformers import AutoTokenizer
    hf_tok = AutoTokenizer.from_pretrained(gen_ckpt)
    spec = prompt_spec(hf_tok.chat_template,
                       lambda m: hf_tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True))
    return hf_tok, PromptBuilder(spec, hf_tok.backend_tokenizer, budget=2048 - cfg.max_answer_tokens)


def block_rows(cfg, n: int, epoch: int) -> set[int]:
    """The examples this epoch trains on prompts read from passage KV; the others (a share
    `block_attention_mix`) on the plain prompt. Drawn from the seed and the epoch, so a resumed run draws the same."""
    if not cfg.block_attention:
        return set()
    full = random.Random(cfg.seed * 1000 + 29 + epoch).sample(range(n), round(cfg.block_attention_mix * n))
    return set(range(n)) - set(full)


def train_generator(cfg, run, state, budget, items, passages, anchors, gen_ckpt, encoder, enc_tok):
    import torch
    from transformers import AutoModelForCausalLM
    hf_tok, builder = generator_builder(cfg, gen_ckpt)
    resume = run / "checkpoint" / "generator"
    resuming = resume.is_dir()
    model = AutoModelForCausalLM.from_pretrained(resume if resuming and not cfg.lora else gen_ckpt, dtype=torch.float32,
                                                 attn_implementation="sdpa")
    model.eval()
    eos_id = hf_tok.convert_tokens_to_ids("<|im_end|>")
    if eos_id is None or eos_id == hf_tok.unk_token_id:
        eos_id = model.config.eos_token_id if isinstance(model.config.eos_token_id, int) else model.config.eos_token_id[0]
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else eos_id
    if cfg.lora:
        from peft import LoraConfig, PeftModel, get_peft_model
        if resuming:        # a LoRA checkpoint holds the adapter alone
            model = PeftModel.from_pretrained(model, resume, is_trainable=True)
        else:
            model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                     "gate_proj", "up_proj", "down_proj"]))
    with autocast(cfg.precision):
        contexts, frozen = generator_contexts(cfg, run, items, passages, anchors, encoder, enc_tok)
    examples = generator_examples(cfg, items, passages, contexts, builder, eos_id)
    blocked = generator_examples(cfg, items, passages, contexts, builder, eos_id, block_example) \
        if cfg.block_attention else []
    models = {"generator": model} | ({"encoder": encoder} if cfg.joint else {})
    trainer = Trainer(run, state, models, cfg.generator_lr, cfg, budget)
    per_epoch = -(-len(items) // cfg.grad_accumulation)
    trainer.progress(per_epoch * cfg.generator_epochs, "generator" + (" (joint)" if cfg.joint else ""))
    while state.epoch < cfg.generator_epochs and not trainer.done():
        order = list(range(len(items)))
        random.Random(cfg.seed * 1000 + 17 + state.epoch).shuffle(order)
        from_blocks = block_rows(cfg, len(items), state.epoch)
        for s in range(state.step - state.epoch * per_epoch, per_epoch):
            total = 0.0
            batch = order[s * cfg.grad_accumulation:(s + 1) * cfg.grad_accumulation]
            for i in batch:
                with autocast(cfg.precision):       # per example, as the retriever's steps
                    if cfg.joint:
                        q = embed(encoder, enc_tok, [items[i].question], grad=True)[0]
                        d = torch.tensor(np.stack([frozen[r] for r in contexts[i]]))
                        loss = rag_marginal_nll(q, d, sequence_logprobs(model, examples[i], pad_id), cfg.temperature)
                    elif i in from_blocks:
                        loss = block_loss(model, *blocked[i], repair=PASSAGE_KV_REPAIR)
                    else:
                        loss = answer_loss(model, *examples[i])
                (loss / len(batch)).backward()
                total += loss.item() / len(batch)
            trainer.step(total)
            if trainer.done():
                break
        else:
            state.epoch += 1
    trainer.close()
    return model, hf_tok


def run_finetune(cfg: FinetuneConfig) -> Path:
    from tokenizers import Tokenizer
    _validate(cfg)
    import torch
    torch.manual_seed(cfg.seed)
    run = Path(cfg.out)
    state_path = run / "state.json"
    state = RunState(**json.loads(state_path.read_text())) if state_path.exists() else RunState()
    if state.phase == "done":
        raise UserInputError(f"{run} holds a finished run; choose a new --out")
    if state_path.exists():
        _say(f"resuming {run}: phase {state.phase}, epoch {state.epoch}, step {state.step}")
    enc_ckpt, gen_ckpt = encoder_checkpoint(cfg.encoder), generator_checkpoint(cfg.generator)
    given, cfg = cfg, _resolved(cfg, gen_ckpt)
    budget = Budget(cfg.max_minutes, state.seconds)
    # Every check of the input comes before RUN is made, so a refused run leaves nothing there.
    passages = load_passages(cfg, Tokenizer.from_file(str(enc_ckpt / "tokenizer.json")))
    synthetic_file = synthetic_questions(cfg, run, budget, enc_ckpt, gen_ckpt, passages) \
        if cfg.uses_synthetic else None
    train_files = [Path(p) for p in (cfg.train, synthetic_file) if p]
    # The labels where there are any (the synthetic questions then warm the retriever up), else the synthetic ones.
    items, positives, anchors = load_data(cfg, train_files[:1], passages)
    warmup = load_data(cfg, [synthetic_file], passages) if cfg.train and synthetic_file else None
    run.mkdir(parents=True, exist_ok=True)
    _say(f"{len(items)} training questions" + (f" after {len(warmup[0])} synthetic ones for the retriever"
                                               if warmup else "") + f", {len(passages)} passages")
    if warmup and not state_path.exists():
        state.phase = "synthetic"
    if state.phase == "synthetic" and not warmup:
        raise UserInputError(f"{run} was started with --train and --synthetic: resume it with both")

    t0 = time.perf_counter()
    dev = read_qa(cfg.dev) if cfg.dev else None
    if state.phase == "synthetic":
        train_retriever(synthetic_warmup(given, cfg), run, state, budget, warmup[0], passages, *warmup[1:],
                        enc_ckpt, gen_ckpt, dev)
        state.phase, state.epoch, state.step = "retriever", 0, 0
        save_state(state_path, state, budget)
    if state.phase == "retriever":
        encoder, enc_tok = train_retriever(cfg, run, state, budget, items, passages, positives, anchors,
                                           enc_ckpt, gen_ckpt, dev)
        state.report["retriever"] = round(time.perf_counter() - t0, 1)
        state.phase, state.epoch, state.step = "generator", 0, 0
        save_state(state_path, state, budget)
    else:
        from transformers import AutoModel, AutoTokenizer
        encoder, enc_tok = AutoModel.from_pretrained(run / "checkpoint" / "encoder").eval(), AutoTokenizer.from_pretrained(enc_ckpt)
    t1 = time.perf_counter()
    generator, gen_tok = train_generator(cfg, run, state, budget, items, passages, anchors, gen_ckpt, encoder, enc_tok)
    state.report["generator"] = round(time.perf_counter() - t1, 1)

    if cfg.lora:
        generator = generator.merge_and_unload()     # export takes a plain checkpoint
    for name, model, tok, base, files in (("encoder", encoder, enc_tok, enc_ckpt, train_files),
                                          ("generator", generator, gen_tok, gen_ckpt, train_files[:1])):
        tmp = run / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "ragrt-source.txt").write_text(f"{checkpoint_name(base)}, fine-tuned on {' and '.join(p.name for p in files)}\n")
        if name == "generator":
            _write_json(tmp / TRAINING_RECORD, {"block_attention": cfg.block_attention,
                                                "block_attention_mix": cfg.block_attention_mix,
                                                "passage_kv_repair": PASSAGE_KV_REPAIR if cfg.block_attention else 0})
        shutil.rmtree(run / name, ignore_errors=True)
        os.replace(tmp, run / name)
    state.phase = "done"
    state.report["total"] = round(budget.spent(), 1)
    _write_json(run / "finetune.json", {"config": {k: str(v) for k, v in asdict(cfg).items()},
                                        "questions": len(items), "passages": len(passages),
                                        "synthetic_warmup_questions": len(warmup[0]) if warmup else 0,
                                        "report": state.report, "losses": state.losses})
    save_state(state_path, state, budget)
    shutil.rmtree(run / "checkpoint", ignore_errors=True)
    _say(f"done in {state.report['total'] / 60:.1f} min: {run / 'encoder'} and {run / 'generator'} "
         f"(retriever {state.report.get('retriever', 0):.0f} s, generator {state.report['generator']:.0f} s)")
    return run
