"""Dialogue history and task prompts: read from the manifest, folded into query and prompt within budget."""
import dataclasses

import pytest

from ragrt import Engine, Turn, UserInputError
from ragrt.decoding.prompt import PromptBuilder
from ragrt.retrieval.passages import Passage

PASSAGES = [Passage("lists#0", "Lists", "Use list.copy() or a slice to copy a list.")]


@pytest.fixture(scope="module")
def engine(tiny_bundle):
    return Engine.open(tiny_bundle, threads=1)


def text_of(engine, builder, question):
    return engine.tokenizer.decode(builder.build(question, PASSAGES).ids)


def test_history_goes_before_the_question_oldest_first(engine):
    history = [Turn("user", "Tell me about tuples."), Turn("assistant", "They are immutable.")]
    builder = PromptBuilder(engine.manifest.prompt, engine.tokenizer, budget=1000, history=history)
    text = text_of(engine, builder, "And lists?")
    assert text.index("User: Tell me about tuples.") < text.index("Assistant: They are immutable.") \
        < text.index("And lists?")
    assert not builder.build("And lists?", PASSAGES).truncated


def test_a_long_history_keeps_the_latest_turns_within_budget(engine):
    history = [Turn("user", f"turn number {i} " + "words " * 20) for i in range(40)]
    builder = PromptBuilder(engine.manifest.prompt, engine.tokenizer, budget=1000, history=history)
    prompt = builder.build("And lists?", PASSAGES)
    text = engine.tokenizer.decode(prompt.ids)
    assert len(prompt.ids) <= 1000 and prompt.truncated
    assert "turn number 39" in text and "turn number 0 " not in text


def test_summarize_uses_the_manifest_template(engine):
    spec = engine.manifest.prompt
    builder = PromptBuilder(spec, engine.tokenizer, budget=400, task="summarize")
    text = text_of(engine, builder, "lists")
    assert spec.tasks["summarize"].system in text and "Topic: lists" in text


def test_a_bundle_without_tasks_says_how_to_get_them(engine):
    old = dataclasses.replace(engine.manifest.prompt, tasks={})
    with pytest.raises(UserInputError, match="task must be one of qa.*re-export"):
        PromptBuilder(old, engine.tokenizer, budget=400, task="summarize")


def test_the_users_recent_turns_join_the_retrieval_query(engine, monkeypatch):
    seen = []
    embed = engine.encoder.embed_all
    monkeypatch.setattr(engine.encoder, "embed_all", lambda texts: seen.extend(texts) or embed(texts))
    history = [{"role": "user", "content": "tuples"}, {"role": "assistant", "content": "immutable"},
               {"role": "user", "content": "json"}, {"role": "user", "content": "generators"}]
    engine.ask("and copying?", history=history, max_new_tokens=2)
    assert seen == ["json generators and copying?"]


@pytest.mark.parametrize("history,words", [
    ("not a list", "history must be a list"),
    ([{"role": "robot", "content": "x"}], "history\\[0\\] must be"),
    ([{"role": "user"}], "history\\[0\\] must be"),
    ([Turn("user", "ok"), 5], "history\\[1\\] must be"),
])
def test_bad_history_is_a_user_error(engine, history, words):
    with pytest.raises(UserInputError, match=words):
        engine.ask("q", history=history)
