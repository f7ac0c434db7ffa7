"""Synthetic questions from a corpus without labels (export/data/synth.py) and `ragrt finetune --corpus` alone."""
import json

import pytest

from ragrt.cli import main
from ragrt.evaluate import read_qa
from ragrt.retrieval.passages import Passage, passage_text

from ragrt.export.data import synth
from ragrt.export.data.synth import Synthetic

TOPICS = ["lists", "tuples", "json", "files", "generators", "threads", "sets", "dicts", "strings", "bytes",
          "modules", "classes", "functions", "loops", "errors", "logging", "sockets", "regex", "dates", "paths",
          "sorting", "iterators", "decorators", "unicode"]
# One short document per topic, a passage each: a question sentence, its answer, and a title.
CORPUS = [{"id": t, "title": f"Library — Using {t}",
           "text": f"How do I use {t} in Python? Import the module for {t} and call it. Python has {t}."}
          for t in TOPICS]


@pytest.fixture()
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in CORPUS))
    return path


def test_structure_questions_are_question_sentences_and_headings():
    first = Passage("d#0", "4. Data Structures — 4.1. More on Lists",
                    "Lists have methods. How do I copy a list? Use list.copy() or a slice. It copies.\n\nAnother.")
    assert synth.structure_questions(first) == [
        Synthetic("How do I copy a list?", "Use list.copy() or a slice. It copies. Another.", "d#0", "structure"),
        Synthetic("What does the documentation say about More on Lists?", "Lists have methods. How do I copy a list? "
                  "Use list.copy() or a slice. It copies. Another.", "d#0", "structure")]
    # A later passage of the document asks nothing and opens nothing: no question.
    assert synth.structure_questions(Passage("d#1", "Data — Lists", "Lists have methods. Why? Because.")) == []
    faq = Passage("f#0", "FAQ — Why is Python slow?", "It is interpreted.")
    assert [q.question for q in synth.structure_questions(faq)] == ["Why is Python slow?"]


def test_opening_keeps_whole_sentences_within_the_word_limit():
    text = "One two three. Four five six seven. Eight."
    assert synth.opening(text, words=4) == "One two three."
    assert synth.opening(text, words=7) == "One two three. Four five six seven."
    assert synth.opening("a " * 100, words=60) == " ".join(["a"] * 60)


def test_clean_question_keeps_the_first_question_of_the_reply():
    assert synth.clean_question('Question: "How do I copy a list? It is easy.\nmore') == "How do I copy a list?"
    assert synth.clean_question('"What is a more technical tutorial on how\ndescriptors work?"') == \
        "What is a more technical tutorial on how descriptors work?"
    assert synth.clean_question("Lists are mutable.") is None
    assert synth.clean_question("Lists are mutable, as the docs say in many words, " * 3 + "right?") is None
    assert synth.clean_question("Why?") is None


def test_round_trip_drops_a_question_whose_passage_is_not_retrieved(tiny_encoder_dir, tmp_path):
    passages = [Passage(f"{t}#0", "", f"{t} are a thing in the python docs, {i} of them") for i, t in enumerate(TOPICS)]
    # A question worded as a passage's very text finds that passage first.
    own = Synthetic(passage_text(passages[0]), "", passages[0].id, "structure")
    other = Synthetic(passage_text(passages[1]), "", passages[2].id, "structure")
    cfg = synth.SynthConfig(corpus=tmp_path, out=tmp_path / "q.jsonl", encoder=tiny_encoder_dir, generator=None,
                            round_trip_k=1)
    assert synth.round_trip(cfg, [own, other], passages, [0, 1, 2]) == [own]


def test_dedupe_keeps_one_question_per_text_and_per_passage_and_source():
    qs = [Synthetic("How do I copy a list?", "a", "l#0", "structure"),
          Synthetic("how do I copy a list", "b", "m#0", "generator"),       # the same question, normalised
          Synthetic("What is a list?", "c", "l#0", "structure"),            # its passage has one already
          Synthetic("What is a list?", "d", "l#0", "generator")]
    assert synth.dedupe(qs) == [qs[0], qs[3]]


def test_generator_questions_come_from_the_generator(tiny_encoder_dir, tiny_generator_dir, tmp_path, monkeypatch):
    """The tiny random generator writes no question: its replies are cleaned, and one that is a question is kept
    with the passage's best-matching sentences as its answer."""
    replies = []
    real = synth.clean_question
    monkeypatch.setattr(synth, "clean_question", lambda r: replies.append(r) or real(r) or "How do I use json?")
    cfg = synth.SynthConfig(corpus=tmp_path, out=tmp_path / "q.jsonl", encoder=tiny_encoder_dir,
                            generator=tiny_generator_dir, max_new_tokens=4, batch_size=2)
    passages = [Passage("a#0", "A", "Lists are mutable. The json module\n  parses JSON."),
                Passage("b#0", "B", "Tuples are not.")]
    got, asked = synth.generator_questions(cfg, passages)
    assert len(replies) == 2 == asked and all(isinstance(r, str) for r in replies)
    assert got[0] == Synthetic("How do I use json?", "The json module parses JSON.", "a#0", "generator")


def test_synth_writes_questions_that_train_reads_back(corpus, tiny_encoder_dir, tiny_generator_dir, tmp_path, capsys):
    out = tmp_path / "q.jsonl"
    assert main(["data", "synth", "--corpus", str(corpus), "--out", str(out), "--encoder", str(tiny_encoder_dir),
                 "--source", "structure", "--round-trip-k", str(len(TOPICS)), "--max-questions", "10"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    stats = json.loads((tmp_path / "q.jsonl.stats.json").read_text())
    # 10 passages sampled, each with its question sentence and its heading; the round trip keeps all at k = 24,
    # and the dedupe one question per passage: the question sentence, found first.
    assert stats["passages"] == len(TOPICS) and stats["sampled"] == 10
    assert stats["candidates"] == stats["round_trip"] == {"structure": 20} and stats["kept"] == {"structure": 10}
    assert {r["source"] for r in rows} == {"structure"} and len(rows) == 10
    for r in rows:
        topic = r["positive_ids"][0]
        assert r["passage"] == f"{topic}#0" and r["question"] == f"How do I use {topic} in Python?"
        assert r["answer"] == f"Import the module for {topic} and call it. Python has {topic}."
    assert [qa.question for qa in read_qa(out)] == [r["question"] for r in rows]
    assert "10 questions written" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--max-questions", "0"], "--max-questions must be at least 1, got 0"),
    (["--round-trip-k", "0"], "--round-trip-k must be at least 1, got 0"),
    (["--corpus", "MISSING"], "no such file"),
    (["--corpus", "SMALL"], "5 passages, too few to learn from without labels"),
    (["--corpus", "UNREADABLE"], "invalid JSON"),
], ids=["max-questions", "round-trip-k", "missing", "too-small", "unreadable"])
@pytest.mark.parametrize("command", ["synth", "finetune"])
def test_bad_input_is_one_line_and_writes_nothing(command, args, message, corpus, tiny_corpus, tiny_encoder_dir,
                                                  tiny_generator_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\xff\xfe{not json\n")
    paths = {"MISSING": str(tmp_path / "absent.jsonl"), "SMALL": str(tiny_corpus), "UNREADABLE": str(bad)}
    args = [paths.get(a, a) for a in args]
    if "--corpus" not in args:
        args += ["--corpus", str(corpus)]
    out = tmp_path / "out"
    models = ["--encoder", str(tiny_encoder_dir), "--generator", str(tiny_generator_dir)]
    argv = ["data", "synth", "--out", str(out)] if command == "synth" else ["finetune", "--out", str(out)]
    assert main(argv + models + args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_finetune_on_the_corpus_alone(corpus, tiny_encoder_dir, tiny_generator_dir, tmp_path, monkeypatch, capsys):
    from ragrt.export.train import finetune
    teacher_calls = []
    real_keep = finetune.Teacher.keep
    monkeypatch.setattr(finetune.Teacher, "keep", lambda self, *a: teacher_calls.append(1) or real_keep(self, *a))
    run = tmp_path / "run"
    argv = ["finetune", "--corpus", str(corpus), "--out", str(run), "--encoder", str(tiny_encoder_dir),
            "--generator", str(tiny_generator_dir), "--source", "both", "--round-trip-k", str(len(TOPICS)),
            "--max-questions", "6", "--epochs", "1", "--generator-epochs", "1", "--batch-size", "4", "--k", "2",
            "--max-steps", "2"]
    assert main(argv) == 0
    assert (run / "encoder" / "config.json").is_file() and (run / "generator" / "config.json").is_file()
    questions = read_qa(run / "synthetic.jsonl")
    assert len(questions) >= 6
    assert finetune.training_record(run / "generator")["block_attention"] is True
    report = json.loads((run / "finetune.json").read_text())
    assert report["questions"] == len(questions) and report["config"]["teacher"] == "True"
    assert set(report["report"]["teacher_dropped"]) == {"0"} and teacher_calls
    assert "synthetic.jsonl" in (run / "encoder" / "ragrt-source.txt").read_text()


def test_beside_labels_synthetic_questions_warm_the_retriever_up_and_skip_the_generator(
        corpus, tiny_encoder_dir, tiny_generator_dir, tmp_path, monkeypatch):
    """One retriever epoch on the synthetic questions (teacher and BM25 negatives on), then the labels'
    epochs (both off, as for labels alone); the generator trains on the labels alone."""
    from ragrt.export.train import finetune
    run, labels = tmp_path / "run", tmp_path / "train.jsonl"
    labels.write_text("".join(json.dumps({"question": f"What is {t} for?", "answer": f"Python has {t}.",
                                          "positive_ids": [t]}) + "\n" for t in TOPICS[:6]))
    run.mkdir()
    (run / "synthetic.jsonl").write_text("".join(json.dumps({"question": f"How do I use {t} in Python?",
                                                              "answer": f"Import the module for {t}.",
                                                              "positive_ids": [t], "passage": f"{t}#0"}) + "\n"
                                                  for t in TOPICS[6:16]))
    phases = []
    real = finetune.train_retriever
    monkeypatch.setattr(finetune, "train_retriever", lambda cfg, run_, state, *a: phases.append(
        (state.phase, cfg.epochs, cfg.teacher, cfg.bm25_negatives, len(a[1]))) or real(cfg, run_, state, *a))
    argv = ["finetune", "--corpus", str(corpus), "--train", str(labels), "--synthetic", "--out", str(run),
            "--encoder", str(tiny_encoder_dir), "--generator", str(tiny_generator_dir), "--epochs", "2",
            "--generator-epochs", "1", "--batch-size", "4", "--k", "2", "--dev", str(labels)]
    assert main(argv) == 0
    assert phases == [("synthetic", 1, True, 1, 10), ("retriever", 2, False, 0, 6)]
    report = json.loads((run / "finetune.json").read_text())
    assert report["questions"] == 6 and report["synthetic_warmup_questions"] == 10
    assert {k for k in report["report"] if "dev_recall" in k} == {
        "synthetic_dev_recall@5_before", "synthetic_dev_recall@5_after", "dev_recall@5_before", "dev_recall@5_after"}
    assert set(report["report"]["teacher_dropped"]) == {"synthetic-0"}
    # Steps: 10 synthetic questions in batches of 4, once; 6 labelled, twice; the generator 6 in fours, once.
    assert [len(report["losses"][p]) for p in ("synthetic", "retriever", "generator")] == [3, 4, 2]
    assert "synthetic.jsonl" in (run / "encoder" / "ragrt-source.txt").read_text()
    assert "synthetic.jsonl" not in (run / "generator" / "ragrt-source.txt").read_text()
    # A run stopped in its warm-up resumes only with the options that started it.
    (run / "state.json").write_text(json.dumps({"phase": "synthetic"}))
    assert main(argv[:5] + argv[6:]) == 2


def test_the_teacher_drops_a_negative_that_scores_as_well_as_the_positive(tiny_generator_dir):
    from ragrt.evaluate import QA
    from ragrt.export.train.finetune import Teacher
    passages = [Passage("a#0", "A", "Lists are mutable."), Passage("a#1", "A", "Lists are mutable."),
                Passage("c#0", "C", "The GIL lets one thread run.")]
    teacher = Teacher(tiny_generator_dir, [QA("What are lists?", "", ("a#0",))], passages, [{0}])
    # Pool indices 0 and 1 are passages 1 and 2: passage 1 is the positive's twin, so it goes;
    # passage 2 stays if it scores below the positive.
    kept, dropped = teacher.keep([[0, 1]], [1, 2])
    scores = teacher.scores
    assert scores[(0, 1)] == pytest.approx(scores[(0, 0)], abs=1e-5) and 0 not in kept[0]
    assert (kept == [[1]]) == (scores[(0, 2)] < scores[(0, 0)]) and dropped == 2 - len(kept[0])


def test_a_rerun_reuses_the_synthetic_questions(corpus, tmp_path, monkeypatch):
    """RUN/synthetic.jsonl is written once: a resumed run trains on the same (perhaps edited) questions."""
    from ragrt.export.train import finetune
    run = tmp_path / "run"
    run.mkdir()
    (run / "synthetic.jsonl").write_text('{"question": "edited?", "answer": "a", "positive_ids": ["lists"]}\n')
    monkeypatch.setattr(finetune, "synthesize", lambda *a: pytest.fail("synthesized again"))
    cfg = finetune.FinetuneConfig(corpus=corpus, train=None, out=run)
    assert finetune.synthetic_questions(cfg, run, finetune.Budget(0, 0), tmp_path, tmp_path, []) == run / "synthetic.jsonl"


def test_bm25_negatives_are_the_lexical_near_misses_but_not_positives():
    from ragrt.export.train.contrastive import bm25_negatives
    texts = ["json parses documents", "the json module parses json documents", "threads and locks", "json"]
    got = bm25_negatives(["json documents", "locks"], texts, [{1}, {2}], per_query=2)
    assert got[0] == [0, 3] and got[1] == []      # row 1 is the positive; nothing else mentions locks


def test_a_synthetic_question_is_anchored_to_the_passage_it_was_written_from(tmp_path):
    """Its label names the document, whose passages stay out of the negatives; the passage it was
    written from alone is what training pulls close, scores against and puts in the prompt."""
    from ragrt.export.train.finetune import FinetuneConfig, load_data
    passages = [Passage(f"d#{i}", "D", f"part {i}") for i in range(4)] + [Passage("e#0", "E", "other")]
    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"question": "written?", "answer": "a", "positive_ids": ["d"], "passage": "d#2"}\n'
                  '{"question": "labelled?", "answer": "a", "positive_ids": ["d"]}\n'
                  '{"question": "moved?", "answer": "a", "positive_ids": ["d"], "passage": "e#0"}\n')
    items, positives, anchors = load_data(FinetuneConfig(corpus=tmp_path, train=None, out=tmp_path), [qa], passages)
    assert [qa.passage for qa in items] == ["d#2", None, "e#0"]
    assert positives == [{0, 1, 2, 3}] * 3
    # A passage outside its own label (the corpus changed since) anchors nothing: the label's passages do.
    assert anchors == [{2}, {0, 1, 2, 3}, {0, 1, 2, 3}]


def test_a_passage_that_is_not_an_id_is_refused(tmp_path):
    from ragrt.errors import CorpusError
    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"question": "q?", "answer": "a", "positive_ids": ["d"], "passage": 3}\n')
    with pytest.raises(CorpusError, match='qa.jsonl:1: "passage" must be a passage id'):
        read_qa(qa)


@pytest.fixture(scope="module")
def base_generator_dir(tiny_generator_dir, tmp_path_factory):
    """The tiny generator without a chat template, as a base model (Gemma 3 270M) comes."""
    import shutil
    out = tmp_path_factory.mktemp("tiny-base") / "generator"
    shutil.copytree(tiny_generator_dir, out)
    (out / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((out / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("kind", ["chat", "base"])
def test_the_shared_prefix_changes_no_score_and_no_reply(kind, request, tmp_path, monkeypatch):
    """Teacher scores and generated questions computed after the prompts' common opening, run once
    and lent to each batch, equal each prompt run whole and alone; a base model, with no chat
    template, is asked by the same worked examples as plain text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from ragrt.export.train.sft import IGNORE, sequence_logprobs
    tiny_generator_dir = request.getfixturevalue({"chat": "tiny_generator_dir", "base": "base_generator_dir"}[kind])
    tok = AutoTokenizer.from_pretrained(tiny_generator_dir)
    assert bool(tok.chat_template) == (kind == "chat")
    model = AutoModelForCausalLM.from_pretrained(tiny_generator_dir, dtype=torch.float32).eval()
    passages = [Passage(f"{t}#0", t.title(), f"{t} are useful " * (1 + 3 * i)) for i, t in enumerate(TOPICS[:5])]
    if kind == "base":
        assert tok.decode(synth.question_prompt(tok, passages[0])).endswith(
            f"{synth.SHOTS[1][1]}\n\n{synth.ASK.format(passage=passage_text(passages[0]))}\n\nQuestion:\n")
    pairs = [(f"What are {t}?", p) for t in ("lists", "sets") for p in passages]
    alone = []
    with torch.no_grad():
        for question, p in pairs:
            prompt, q = synth.question_prompt(tok, p), tok.encode(question, add_special_tokens=False)
            alone.append(float(sequence_logprobs(model, [(prompt + q, [IGNORE] * len(prompt) + q)], tok.eos_token_id)[0]))
    assert synth.question_logprobs(model, tok, pairs, batch=4) == pytest.approx(alone, abs=1e-4)

    replies = []
    monkeypatch.setattr(synth, "clean_question", lambda r: replies.append(r))
    cfg = synth.SynthConfig(corpus=tmp_path, out=tmp_path / "q.jsonl", encoder=tmp_path,
                            generator=tiny_generator_dir, max_new_tokens=6, batch_size=3)
    synth.generator_questions(cfg, passages)
    with torch.no_grad():
        want = [tok.decode(model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False,
                                          pad_token_id=tok.eos_token_id)[0, len(ids):], skip_special_tokens=True)
                for ids in (synth.question_prompt(tok, p) for p in passages)]
    assert replies == want


def test_a_rerun_asks_only_the_passages_not_yet_asked(tiny_generator_dir, tmp_path, monkeypatch):
    """The generator's replies are kept as they come: an interrupted synthesis goes on from them.
    A reply of another generator, or a line torn by the interruption, is asked again."""
    out = tmp_path / "q.jsonl"
    mine = str(tiny_generator_dir.resolve())
    synth.replies_path(out).write_text(
        json.dumps({"generator": mine, "passage": "a#0", "reply": "How do I use lists?"}) + "\n"
        + json.dumps({"generator": "/elsewhere", "passage": "b#0", "reply": "How do I use sets?"}) + "\n"
        + '{"generator": "' + mine + '", "passage": "c#0", "rep')
    passages = [Passage(f"{t}#0", t, f"{t} are a thing.") for t in "abc"]
    asked = []
    real = synth.question_prompt
    monkeypatch.setattr(synth, "question_prompt", lambda tok, p: asked.append(p.id) or real(tok, p))
    cfg = synth.SynthConfig(corpus=tmp_path, out=out, encoder=tmp_path, generator=tiny_generator_dir, max_new_tokens=3)
    got, _ = synth.generator_questions(cfg, passages)
    assert sorted(asked) == ["b#0", "c#0"] and got[0] == Synthetic("How do I use lists?", "a are a thing.", "a#0", "generator")
    assert set(synth.read_replies(synth.replies_path(out), mine)) == {"a#0", "b#0", "c#0"}


def test_a_synthesis_out_of_time_asks_a_seeded_sample(tiny_generator_dir, tmp_path, monkeypatch):
    """`max_seconds` stops the generator between batches; the passages asked by then are a seeded
    draw, not the corpus's first ones."""
    import itertools
    passages = [Passage(f"{t}#0", t, f"{t} are a thing.") for t in "abcdefgh"]
    asked = []
    real = synth.question_prompt
    monkeypatch.setattr(synth, "question_prompt", lambda tok, p: asked.append(p.id) or real(tok, p))
    ticks = itertools.count()
    monkeypatch.setattr(synth.time, "monotonic", lambda: float(next(ticks)))     # a second a call
    cfg = synth.SynthConfig(corpus=tmp_path, out=tmp_path / "q.jsonl", encoder=tmp_path, generator=tiny_generator_dir,
                            max_new_tokens=2, batch_size=2, max_seconds=1.5)
    _, n = synth.generator_questions(cfg, passages)
    assert n == len(asked) == 2 and asked != ["a#0", "b#0"]
    assert set(synth.read_replies(synth.replies_path(cfg.out), str(tiny_generator_dir.resolve()))) == set(asked)
