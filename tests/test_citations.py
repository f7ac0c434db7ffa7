"""Quotes (ragrt.citations) and mode extract's sentence choice (ragrt.extract), on hand-made text."""
from hypothesis import given, settings
from hypothesis import strategies as st

from ragrt.citations import MIN_QUOTE_WORDS, find_quotes, grounded_share
from ragrt.extract import ExtractSettings, extract, lead, split_sentences
from ragrt.retrieval.passages import Passage

TEXT = ("Use the reversed built-in function:\n\n   for x in reversed(sequence):\n       ...\n\n"
        "This won't touch your original sequence, but build a new copy with reversed\norder to iterate over.")


def test_a_copied_run_is_found_with_offsets_into_both_texts():
    answer = "You can: build a new copy with reversed order to iterate over. Simple."
    first, second = find_quotes(answer, TEXT)
    # The line break in the passage is not the answer's space, so the run stops before it.
    assert answer[first.answer[0]:first.answer[1]] == TEXT[first.passage[0]:first.passage[1]] == (
        "build a new copy with reversed")
    assert answer[second.answer[0]:second.answer[1]] == TEXT[second.passage[0]:second.passage[1]] == (
        "order to iterate over")
    assert grounded_share(answer, [first, second]) == 10 / 13
    assert grounded_share(answer, [first]) == 6 / 13


def test_short_runs_and_changed_separators_are_not_quotes():
    assert find_quotes("Use the reversed function", TEXT) == []          # three words in a row, then a gap
    assert find_quotes("touch your, original sequence", TEXT) == []      # a comma the passage lacks
    assert find_quotes("USE THE REVERSED BUILT-IN FUNCTION", TEXT) == []  # verbatim means the same case
    assert grounded_share("", []) == 0.0


def test_runs_from_two_places_are_two_quotes_in_answer_order():
    answer = "This won't touch your original sequence. Use the reversed built-in function."
    quotes = find_quotes(answer, TEXT)
    assert [answer[a:b] for a, b in (q.answer for q in quotes)] == [
        "This won't touch your original sequence", "Use the reversed built-in function"]
    assert quotes[0].passage[0] > quotes[1].passage[0]
    assert grounded_share(answer, quotes) == 1.0


WORDS = st.sampled_from(["list", "copy", "a", "the", "x", "sort", "key", "=", "()", "in"])
SEPARATORS = st.sampled_from([" ", " ", "\n", ", ", ". "])


@st.composite
def texts(draw, min_size=1):
    words = draw(st.lists(WORDS, min_size=min_size, max_size=40))
    return "".join(w + draw(SEPARATORS) for w in words).strip()


@settings(max_examples=300, deadline=None)
@given(text=texts(), answer=texts(), cut=st.tuples(st.integers(0, 400), st.integers(0, 400)))
def test_every_quote_is_verbatim_and_quotes_do_not_overlap(text, answer, cut):
    # Half the answers carry a piece of the passage, so that quotes are common.
    a, b = sorted(cut)
    answer = answer[:len(answer) // 2] + " " + text[a:b] + " " + answer[len(answer) // 2:]
    quotes = find_quotes(answer, text)
    for q in quotes:
        assert answer[q.answer[0]:q.answer[1]] == text[q.passage[0]:q.passage[1]]
        assert len(answer[q.answer[0]:q.answer[1]].split()) >= 1
    assert all(x.answer[1] <= y.answer[0] for x, y in zip(quotes, quotes[1:]))
    assert 0.0 <= grounded_share(answer, quotes) <= 1.0


@settings(max_examples=200, deadline=None)
@given(text=texts(min_size=MIN_QUOTE_WORDS), start=st.integers(0, 40), n=st.integers(MIN_QUOTE_WORDS, 40))
def test_an_answer_copied_whole_from_the_passage_is_all_grounded(text, start, n):
    import re
    words = list(re.finditer(r"\w+", text))
    if len(words) < MIN_QUOTE_WORDS:
        return
    start = min(start, len(words) - MIN_QUOTE_WORDS)
    end = min(start + n, len(words)) - 1
    answer = text[words[start].start():words[end].end()]
    assert grounded_share(answer, find_quotes(answer, text)) == 1.0


def test_sentences_end_at_stops_and_blank_lines():
    text = "First one. Second one?  Third\nline continues.\n\nCode:\n\n   x = 1"
    assert [text[a:b] for a, b in split_sentences(text)] == [
        "First one.", "Second one?", "Third\nline continues.", "Code:", "x = 1"]


def passages(*texts):
    return [Passage(f"doc{i}#{i % 2}", "t", t) for i, t in enumerate(texts)]


def test_extract_takes_the_document_opening_and_what_follows_it_in_its_paragraph():
    ps = [Passage("faq#1", "t", "Later details of sorting. More detail here."),
          Passage("faq#0", "t", "Use sorted() to sort a list. It returns a new list.\n\nUnrelated paragraph after it.")]
    answer = extract("How do I sort a list?", ps, [0.6, 0.4], ExtractSettings(words=12))
    assert answer == "Use sorted() to sort a list. It returns a new list."
    # A budget too small for the second sentence ends the run after the first.
    assert extract("How do I sort a list?", ps, [0.6, 0.4], ExtractSettings(words=8)) == "Use sorted() to sort a list."


def test_extract_without_an_opening_weighs_the_question_and_the_prior():
    ps = [Passage("a#3", "t", "Nothing to see. Tuples are immutable sequences."),
          Passage("b#2", "t", "Dictionaries map keys to values.")]
    s = ExtractSettings(words=5, opening=0.0, position=0.0)
    assert extract("Are tuples immutable?", ps, [0.5, 0.5], s) == "Tuples are immutable sequences."
    assert extract("What do dictionaries map?", ps, [0.5, 0.5], s) == "Dictionaries map keys to values."
    assert extract("anything", [], [], s) == ""


def test_lead_keeps_the_passage_spacing_and_stops_after_n_words():
    ps = [Passage("a#0", "t", "One  two\nthree four"), Passage("b#0", "t", "other")]
    assert lead(ps, 3) == "One  two\nthree"
    assert lead(ps, 10) == "One  two\nthree four"
    assert lead([], 3) == ""
