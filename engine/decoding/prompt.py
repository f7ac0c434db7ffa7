"""Building the generator's prompt from the manifest's templates, within the context budget."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from tokenizers import Tokenizer

from ragrt.bundle.manifest import PromptSpec
from ragrt.decoding.blocks import BlockPrompt
from ragrt.errors import UserInputError
from ragrt.retrieval.passages import Passage

_FIELD = re.compile(r"\{(\w+)\}")


def fill(template: str, **values: str) -> str:
    """One-pass substitution: braces inside values (code, user text) are never expanded."""
    return _FIELD.sub(lambda m: values[m.group(1)] if m.group(1) in values else m.group(0), template)


@dataclass(frozen=True)
class Turn:
    """One earlier message of a dialogue."""
    role: str                      # "user" | "assistant"
    content: str


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    passages_used: int             # passages that fit, in whole or truncated
    truncated: bool                # a passage or the question was cut to fit


class PromptBuilder:
    def __init__(self, spec: PromptSpec, tokenizer: Tokenizer, *, budget: int, task: str = "qa",
                 history: Sequence[Turn] = ()):
        self.spec = spec
        self.tokenizer = tokenizer
        self.budget = budget       # prompt tokens allowed: max_context - max_new_tokens
        self.task = spec.task(task)
        self.history = tuple(history)

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def _cut(self, text: str, tokens: int) -> str:
        """The longest prefix of `text` that is at most `tokens` tokens long."""
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        if len(enc.ids) <= tokens:
            return text
        return text[:enc.offsets[tokens][0]] if tokens > 0 else ""

    def _render(self, context: str, question: str) -> str:
        return fill(self.spec.chat, system=self.task.system, user=fill(self.task.user, context=context, question=question))

    def _question(self, question: str) -> tuple[str, bool]:
        """The question, cut if it would take over half the window, after the dialogue turns that fit."""
        truncated = False
        overhead = self.count(self._render("", ""))
        if overhead + self.count(question) > self.budget // 2:
            # A question that eats the whole window would leave no room for evidence.
            question = self._cut(question, max(self.budget // 2 - overhead, 1))
            truncated = True
        if self.history:
            turns = self._recent_turns(self.budget // 2 - overhead - self.count(question))
            truncated |= len(turns) < len(self.history)
            if turns:
                question = fill(self.spec.history, turns="\n".join(turns)) + question
        return question, truncated

    def build(self, question: str, passages: Sequence[Passage]) -> Prompt:
        """Passages are added in rank order while they fit; the last one that does not is cut.
        The prompt is at most `budget` tokens long."""
        question, truncated = self._question(question)
        # Tokens merge differently across part boundaries, so the parts' counts can add up to less
        # than the whole: the margin grows by the overshoot until the whole fits.
        margin = 8
        while len((prompt := self._build(question, passages, margin, truncated)).ids) > self.budget \
                and prompt.passages_used:
            margin += len(prompt.ids) - self.budget
        return prompt

    def _build(self, question: str, passages: Sequence[Passage], margin: int, truncated: bool) -> Prompt:
        left = self.budget - self.count(self._render("", question)) - margin
        parts: list[str] = []
        sep_tokens = self.count(self.spec.passage_separator)
        for n, p in enumerate(passages, start=1):
            block = fill(self.spec.passage, n=str(n), title=p.title, text=p.text)
            cost = self.count(block) + (sep_tokens if parts else 0)
            if cost > left:
                room = left - (sep_tokens if parts else 0) - self.count(fill(self.spec.passage, n=str(n), title=p.title, text=""))
                if room > 16:
                    parts.append(fill(self.spec.passage, n=str(n), title=p.title, text=self._cut(p.text, room)))
                truncated = True
                break
            parts.append(block)
            left -= cost
        text = self._render(self.spec.passage_separator.join(parts), question)
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return Prompt(ids=ids, passages_used=len(parts), truncated=truncated)

    @property
    def blocks_supported(self) -> bool:
        """Whether passages render the same whatever their rank, as reusable blocks must."""
        return "{n}" not in self.spec.passage

    def build_blocks(self, question: str, passages: Sequence[Passage]) -> tuple[BlockPrompt, bool]:
        """The same text as `build`, in block layout (decoding/blocks.py): the prefix up to the
        context, one block per passage (rendered alone, ending with the separator), and the tail,
        each with the tokens `build` gives that text. Passages are whole or left out, since a cut
        one would not be reusable. Returns the prompt and whether anything was left out or cut."""
        if not self.blocks_supported:
            raise UserInputError("this bundle's passage template numbers passages, so their KV cannot be "
                                 "reused: use passage_kv off, or re-export the bundle")
        question, truncated = self._question(question)
        marker = "\x00CONTEXT\x00"
        before, after = self._render(marker, question).split(marker, 1)
        sep = self.spec.passage_separator
        # Every block ends with the separator, so the one that leads the tail is already there.
        after = after[len(sep):] if after.startswith(sep) else after

        # BPE splits whitespace by what follows it: SmolLM2 tokenizes the separator "\n\n" as two
        # newlines before a word and as one token at the end of a text. A block tokenized alone
        # would end on a token the whole prompt never has, so each part is tokenized with the
        # start of the next one. That is a title or the tail, and the tail's first character
        # stands for both.
        follows = after[:1] or sep[:1]
        prefix, tail = self._encode_before(before, follows), self._encode_before(after, "")
        left = self.budget - len(prefix) - len(tail)
        blocks = []
        for p in passages:
            ids = self._encode_before(fill(self.spec.passage, title=p.title, text=p.text) + sep, follows)
            if len(ids) > left:
                truncated = True
                break
            blocks.append(ids)
            left -= len(ids)
        return BlockPrompt(prefix, tuple(blocks), tail), truncated

    def _encode_before(self, text: str, follows: str) -> tuple[int, ...]:
        """`text`'s tokens as they are when `follows` comes next: `text + follows` tokenized, less
        the tokens of `follows`, where those are its tail and the rest decodes to `text` exactly;
        otherwise (a token would straddle the two) `text` tokenized alone."""
        encode = self.tokenizer.encode
        if follows:
            both, after = encode(text + follows, add_special_tokens=False).ids, encode(follows, add_special_tokens=False).ids
            cut = both[:len(both) - len(after)]
            if both[len(cut):] == after and self.tokenizer.decode(cut, skip_special_tokens=False) == text:
                return tuple(cut)
        return tuple(encode(text, add_special_tokens=False).ids)

    def fixed_prefix(self) -> list[int]:
        """Leading tokens that every prompt of this task starts with (system prompt, chat markup).

        Found by building two prompts that share nothing but the templates; the last two
        common tokens are dropped, as text after them may merge into them differently.
        """
        a = self.build("why?", [Passage("probe#0", "a", "b")]).ids
        b = self.build("Qu", [Passage("probe#1", "Zz", "0")]).ids
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        return a[:max(n - 2, 0)]

    def _recent_turns(self, room: int) -> list[str]:
        """The latest turns that fit in `room` tokens with the history header, oldest first.

        Dialogue and question share half the window, so the passages keep the other half.
        """
        room -= self.count(fill(self.spec.history, turns=""))
        kept: list[str] = []
        for turn in reversed(self.history):
            line = fill(self.spec.turn, role=turn.role.capitalize(), text=turn.content)
            room -= self.count(line) + 1
            if room < 0:
                break
            kept.append(line)
        return kept[::-1]
