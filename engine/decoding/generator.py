"""`Generator`: rows decoding together, the one state object every decode loop drives.

As in onnxruntime-genai: open the model (`open_decoder`), put prompts in a `Generator`, then
take each row's next token and append it, until the rows are done. Finished rows leave
(`keep`), rows join later (`add_prompts`, the server's batcher), and a row rewinds the draft
tokens its check rejected. Greedy answers, RAG-Token, RAG-Sequence and the batcher all drive
it, so the decoder's state never leaves this object.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ragrt.bundle.manifest import GeneratorSpec
from ragrt.decoding.blocks import BlockPrompt, BlockStats, PassageKV
from ragrt.decoding.decoder import Decoder, RowByRowDecoder
from ragrt.decoding.lookup import PromptLookup
from ragrt.decoding.kvquant import KV_INT8, load_kv_scales
from ragrt.decoding.packed import KVDevice, PackedDecoder
from ragrt.decoding.sampling import DecodingConfig, TokenChooser
from ragrt.runtime.sessions import SessionConfig, create_session


def open_decoder(session, spec: GeneratorSpec, kv_scales: np.ndarray | None = None, step_session=None,
                 assemble_session=None, int4_step_session=None):
    """The decoder for the spec's cache layout and batching; `kv_scales` for an int8 cache
    (`ragrt.decoding.kvquant.load_kv_scales`), `step_session` the step graph's (`spec.step_model`),
    `assemble_session` the assembly graph's (`spec.assemble_model`), `int4_step_session` the int4
    step graph's (`spec.int4_step_model`)."""
    if spec.cache == "packed":
        return PackedDecoder(session, spec, kv_scales, step_session, assemble_session, int4_step_session)
    decoder = Decoder(session, spec)
    return RowByRowDecoder(decoder) if decoder.row_by_row else decoder


def load_decoder(root: Path, spec: GeneratorSpec, config: SessionConfig, *, steps: bool = True,
                 assemble: bool = True):
    """A bundle's generator as the engine opens it: its graph, and its step and assembly graphs where
    it has them, the device is the CPU, and `steps` and `assemble` ask for them (computing passage KV
    only prefills blocks, so it passes False for both)."""
    session = create_session(Path(root) / spec.model, config)
    on_cpu = KVDevice.of(session) is None
    step = steps and bool(spec.step_model) and on_cpu
    scales = load_kv_scales(root, spec) if step or np.dtype(spec.kv_dtype) == KV_INT8 else None
    return open_decoder(session, spec, scales, create_session(Path(root) / spec.step_model, config) if step else None,
                        create_session(Path(root) / spec.assemble_model, config)
                        if assemble and spec.assemble_model and on_cpu else None,
                        create_session(Path(root) / spec.int4_step_model, config)
                        if step and spec.int4_step_model else None)


class Generator:
    def __init__(self, decoder, state=None, logits: np.ndarray | None = None, *,
                 passage_kv: PassageKV | None = None, blocks: BlockStats | None = None):
        self.decoder = decoder
        self.state = state
        self.logits = logits          # (rows, V): each row's next-token logits
        self.passage_kv = passage_kv  # prefills BlockPrompts from reused passage KV
        self.blocks = blocks if blocks is not None else BlockStats()

    @property
    def rows(self) -> int:
        return 0 if self.logits is None else len(self.logits)

    def add_prompts(self, prompts: Sequence[Sequence[int] | BlockPrompt],
                    blocks: Sequence[BlockStats | None] | None = None) -> None:
        """Prefills the prompts as new rows after the existing ones: token lists, or BlockPrompts
        where the generator has passage KV. `blocks`: each prompt's own BlockStats, where the rows
        are separate requests (default: the generator's one for all)."""
        in_blocks = self.passage_kv is not None and any(isinstance(p, BlockPrompt) for p in prompts)
        logits, state = (self.passage_kv.prefill(prompts, self.blocks if blocks is None else blocks) if in_blocks
                         else self.decoder.prefill(prompts))
        if self.rows:
            state = self.decoder.merge(self.state, state)
            logits = np.concatenate([self.logits, logits])
        self.state, self.logits = state, logits

    def append(self, tokens: np.ndarray) -> None:
        """One token (rows,) per row: one forward pass for all of them."""
        self.logits, self.state = self.decoder.step(self.state, tokens)

    def append_run(self, tokens: Sequence[int]) -> np.ndarray:
        """Several tokens of a one-row generator in one pass; returns the logits after each (S, V)."""
        run = np.asarray([tokens], dtype=np.int64)
        logits, self.state = self.decoder.forward(self.state, run, np.ones_like(run), num_logits=run.shape[1])
        self.logits = logits[:, -1]
        return logits[0]

    def rewind(self, n: int, logits: np.ndarray) -> None:
        """Drops a one-row generator's last n tokens; `logits` (V,) followed the token now last."""
        self.state = self.decoder.forget(self.state, n)
        self.logits = logits[None]

    def keep(self, rows: Sequence[int]) -> None:
        """Only these rows go on (finished ones leave, so a step spans no dead rows)."""
        if len(rows) < self.rows:
            self.state = self.decoder.select(self.state, rows)
            self.logits = self.logits[list(rows)]

    def logprob(self, continuation: Sequence[int]) -> np.ndarray:
        """log p(continuation | each row so far), float64 (rows,); the rows themselves do not move."""
        return self.decoder.continuation_logprob(self.state, self.logits, continuation)

    def copy(self) -> "Generator":
        """A generator at this point. On a packed cache both share the buffers: positions past a
        row's length belong to whichever of the two ran last, so use one, then the other."""
        return copy.copy(self)


def generate(decoder, prompt: Sequence[int] | BlockPrompt, config: DecodingConfig,
             lookup: PromptLookup | None = None, *, passage_kv: PassageKV | None = None,
             blocks: BlockStats | None = None) -> Iterator[int]:
    """One answer's tokens until EOS or the limit; stopping the iteration stops the work.

    With `lookup` and greedy decoding (penalties and bans included: the choice is a function of
    the logits and the answer so far), each pass also checks the tokens it drafts and keeps those
    the chooser itself picks after each: the same tokens, in fewer passes.
    """
    stop = set(decoder.spec.eos_token_ids)
    context = list(prompt.ids if isinstance(prompt, BlockPrompt) else prompt)
    choose = TokenChooser(config, decoder.spec.eos_token_ids, context)
    gen = Generator(decoder, passage_kv=passage_kv, blocks=blocks)
    gen.add_prompts([prompt])
    drafting = lookup is not None and config.is_greedy
    while len(choose.answer) < config.max_new_tokens:
        token = choose(gen.logits[0])
        if token in stop:
            return
        yield token
        context.append(token)
        left = config.max_new_tokens - len(choose.answer)
        if left == 0:
            return
        draft = lookup.propose(context)[:left] if drafting else []
        if not draft:
            gen.append(np.array([token], dtype=np.int64))
            continue
        logits = gen.append_run([token, *draft])
        accepted = 0
        for t in draft:
            if choose(logits[accepted]) != t:            # the pick a one-token step would make here
                choose.answer.pop()                      # made again from the same logits next round
                break
            if t in stop:
                return
            accepted += 1
            yield int(t)
        context.extend(draft[:accepted])
        gen.rewind(len(draft) - accepted, logits[accepted])


def greedy(decoder, prompt: Sequence[int], max_new_tokens: int, lookup: PromptLookup | None = None) -> Iterator[int]:
    return generate(decoder, prompt, DecodingConfig(max_new_tokens=max_new_tokens), lookup)


def generate_rows(gen: Generator, config: DecodingConfig) -> list[list[int]]:
    """Every row of a prefilled generator decoded on its own to its EOS or the limit, in shared passes."""
    stop = np.array(sorted(gen.decoder.spec.eos_token_ids))
    choosers = [TokenChooser(config, gen.decoder.spec.eos_token_ids) for _ in range(gen.rows)]
    out: list[list[int]] = [[] for _ in choosers]
    done = np.zeros(len(choosers), dtype=bool)
    for i in range(config.max_new_tokens):
        tokens = np.array([c(row) for c, row in zip(choosers, gen.logits)], dtype=np.int64)
        done |= np.isin(tokens, stop)
        if done.all():
            break
        for row in np.flatnonzero(~done):
            out[row].append(int(tokens[row]))
        if i + 1 < config.max_new_tokens:
            # Finished rows keep stepping (on a pad token): the caller may still score from a copy
            # taken at the prompt, whose packed slots must not move.
            gen.append(np.where(done, gen.decoder.pad_id, tokens))
    return out


def greedy_batch(gen: Generator, max_new_tokens: int) -> list[list[int]]:
    return generate_rows(gen, DecodingConfig(max_new_tokens=max_new_tokens))
