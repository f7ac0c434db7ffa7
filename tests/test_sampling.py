"""Decoding controls: the token chooser's rules on hand-made logits, then on the tiny bundle end to end."""
import numpy as np
import pytest

from ragrt.decoding.sampling import DecodingConfig, TokenChooser, banned_tokens
from ragrt.errors import UserInputError

EOS = (0,)


def choose_all(config, rows):
    chooser = TokenChooser(config, EOS)
    return [chooser(np.asarray(r, dtype=np.float32)) for r in rows]


def test_greedy_is_the_argmax():
    assert choose_all(DecodingConfig(), [[0, 1, 5, 2], [0, 9, 1, 2]]) == [2, 1]


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    chooser = TokenChooser(DecodingConfig(repetition_penalty=2.0), EOS)
    chooser.answer = [1, 2]
    out = chooser.processed(np.array([0.0, 4.0, -1.0, 3.0], dtype=np.float32))
    assert out.tolist() == [0.0, 2.0, -2.0, 3.0]
    # Token 1 (4.0) was said already: 3 wins once 1 is penalised.
    assert chooser(np.array([0.0, 4.0, -1.0, 3.0], dtype=np.float32)) == 3


def test_repetition_window_forgets_old_tokens():
    chooser = TokenChooser(DecodingConfig(repetition_penalty=4.0, repetition_window=2), EOS)
    chooser.answer = [1, 2, 3]
    assert chooser.processed(np.array([0.0, 4.0, 4.0, 4.0]))[[1, 2, 3]].tolist() == [4.0, 1.0, 1.0]


def test_no_repeat_ngram_bans_the_completion_of_a_seen_ngram():
    assert banned_tokens([5, 6, 7, 5, 6], 3) == {7}
    assert banned_tokens([5, 6, 7, 5, 8], 3) == set()
    assert banned_tokens([5, 6], 1) == {5, 6}
    chooser = TokenChooser(DecodingConfig(no_repeat_ngram_size=3), EOS)
    chooser.answer = [1, 2, 3, 1, 2]
    assert chooser(np.array([0.0, 0.0, 0.0, 9.0, 1.0])) == 4


def test_min_new_tokens_bans_eos_until_reached():
    rows = [[9.0, 1.0, 0.0]] * 3
    assert choose_all(DecodingConfig(min_new_tokens=2), rows) == [1, 1, 0]


def test_sampling_is_reproducible_by_seed_and_varies_without_one():
    rows = [np.linspace(0, 1, 50)] * 40
    a = choose_all(DecodingConfig(temperature=1.0, seed=7), rows)
    assert a == choose_all(DecodingConfig(temperature=1.0, seed=7), rows)
    assert a != choose_all(DecodingConfig(temperature=1.0, seed=8), rows)
    assert len(set(a)) > 5


def test_top_k_and_top_p_restrict_the_draw():
    rows = [[0.0, 3.0, 2.9, 2.8, 2.7]] * 200
    assert set(choose_all(DecodingConfig(temperature=1.0, top_k=2, seed=1), rows)) == {1, 2}
    assert set(choose_all(DecodingConfig(temperature=1.0, top_k=1, seed=1), rows)) == {1}
    peaked = [[0.0, 10.0, 1.0, 1.0, 1.0]] * 100
    assert set(choose_all(DecodingConfig(temperature=1.0, top_p=0.5, seed=1), peaked)) == {1}
    assert len(set(choose_all(DecodingConfig(temperature=5.0, seed=1), peaked))) > 2


@pytest.mark.parametrize("option,value,message", [
    ("temperature", -1, "temperature"), ("temperature", float("nan"), "temperature"), ("top_p", 0.0, "top_p"),
    ("top_k", -1, "top_k"), ("seed", "x", "seed"), ("repetition_penalty", 0.5, "repetition_penalty"),
    ("no_repeat_ngram_size", 99, "no_repeat_ngram_size"), ("stop", ["a", ""], "stop"), ("stop", ["a"] * 5, "stop"),
    ("min_new_tokens", 500, "min_new_tokens"), ("max_new_tokens", 0, "max_new_tokens"), ("top", 1, "unknown"),
])
def test_bad_options_are_refused_with_their_name(option, value, message):
    with pytest.raises(UserInputError, match=message):
        DecodingConfig().updated(512, **{option: value})


def test_stop_string_may_be_one_string():
    assert DecodingConfig().updated(512, stop="\n\n").stop == ("\n\n",)


@pytest.fixture(scope="module")
def engine(tiny_bundle):
    from ragrt import Engine
    return Engine.open(tiny_bundle)


def test_engine_greedy_default_is_unchanged_and_sampling_follows_the_seed(engine):
    greedy = engine.ask("How do I copy a list?", k=2, max_new_tokens=12)
    assert engine.ask("How do I copy a list?", k=2, max_new_tokens=12, temperature=0).answer == greedy.answer
    a = engine.ask("How do I copy a list?", k=2, max_new_tokens=12, temperature=1.5, seed=1)
    b = engine.ask("How do I copy a list?", k=2, max_new_tokens=12, temperature=1.5, seed=1)
    c = engine.ask("How do I copy a list?", k=2, max_new_tokens=12, temperature=1.5, seed=2)
    assert a.answer == b.answer and a.answer != c.answer


def test_stop_strings_end_the_answer_before_them(engine):
    full = engine.ask("How do I copy a list?", k=2, max_new_tokens=24)
    assert len(full.answer) > 4
    stop = full.answer[2:4]
    cut = engine.ask("How do I copy a list?", k=2, max_new_tokens=24, stop=[stop])
    assert cut.answer == full.answer[:full.answer.index(stop)].strip()
    assert cut.finish_reason == "stop"
    pieces = list(engine.stream("How do I copy a list?", k=2, max_new_tokens=24, stop=[stop]))
    assert stop not in "".join(pieces)


def test_finish_reason_says_length_at_the_limit(engine):
    assert engine.ask("How do I copy a list?", k=2, max_new_tokens=3, min_new_tokens=3).finish_reason == "length"


def test_penalties_apply_in_every_mode_and_sequence_refuses_sampling(engine):
    for mode in ("concat", "token", "sequence"):
        ans = engine.ask("How do I copy a list?", k=2, mode=mode, max_new_tokens=16, no_repeat_ngram_size=2)
        assert ans.new_tokens > 0
    assert engine.ask("How do I copy a list?", k=2, mode="token", max_new_tokens=8, temperature=1.0, seed=3).new_tokens
    with pytest.raises(UserInputError, match="sequence"):
        engine.ask("How do I copy a list?", k=2, mode="sequence", temperature=0.7)


def test_no_repeat_ngram_answer_has_no_repeated_ngram(engine):
    from ragrt.decoding.generator import generate
    prompt = engine.prepare("How do I copy a list?", k=2).builder.build("How do I copy a list?", []).ids
    tokens = list(generate(engine.decoder, prompt, DecodingConfig(max_new_tokens=40, no_repeat_ngram_size=2)))
    pairs = list(zip(tokens, tokens[1:]))
    assert len(pairs) == len(set(pairs))


def test_batched_rows_sample_as_they_would_alone(engine):
    from ragrt.serve.batcher import Batcher
    prepared = engine.prepare("How do I copy a list?", k=2)
    prompt = prepared.builder.build(prepared.question, prepared.passages).ids
    configs = [DecodingConfig(max_new_tokens=10, temperature=1.0, seed=s) for s in range(4)] + [
        DecodingConfig(max_new_tokens=10, repetition_penalty=1.3)]
    from ragrt.decoding.generator import generate
    alone = [list(generate(engine.decoder, prompt, c)) for c in configs]
    batcher = Batcher(engine.decoder, max_batch=4)
    try:
        streams = [batcher.submit(prompt, c, deadline_s=60) for c in configs]
        assert [list(s) for s in streams] == alone
    finally:
        batcher.close()


def test_a_tiny_temperature_samples_the_argmax():
    assert set(choose_all(DecodingConfig(temperature=5e-324, seed=0), [[0.0, 1.0, 0.5]] * 20)) == {1}


def test_copy_bias_continues_the_run_the_answer_copies_from_the_prompt():
    from ragrt.decoding.sampling import DecodingConfig, TokenChooser
    prompt = [9, 5, 6, 7, 1, 5, 6, 2, 5, 3]
    logits = np.zeros(10, dtype=np.float32)
    logits[4] = 1.0                                   # the model's own choice
    config = DecodingConfig(copy_bias=2.0)
    assert not config.is_plain_greedy
    choose = TokenChooser(config, [0], prompt)
    choose.answer = [9, 5, 6]
    assert choose(logits) == 7                        # the longest tail found, [9, 5, 6], was followed by 7
    choose.answer = [1, 5, 6]
    assert choose(logits) == 2                        # [1, 5, 6] -> 2: the longest run wins over the latest [5, 6]
    choose.answer = [8, 8]
    assert choose(logits) == 4                        # nothing copied: the logits decide
    assert TokenChooser(config, [0])(logits) == 4     # no prompt: no bias
    weak = TokenChooser(DecodingConfig(copy_bias=0.5), [0], prompt)
    weak.answer = [9, 5, 6]
    assert weak(logits) == 4                          # a bias below the logit gap changes nothing
