import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from ragrt.errors import CorpusError, UserInputError
from ragrt.export.train.contrastive import SCALE, contrastive_loss, mine_hard_negatives
from ragrt.options import PASSAGE_KV_REPAIR
from ragrt.export.train.sft import (IGNORE, block_example, block_logits, block_loss,
                                    rag_marginal_nll, sft_example)

QA_ROWS = [
    {"question": "How do I copy a list?", "answer": "Use list.copy() or a slice.", "positive_ids": ["lists"]},
    {"question": "What parses JSON?", "answer": "The json module.", "positive_ids": ["json"]},
    {"question": "What is the GIL?", "answer": "A lock: one thread runs bytecode.", "positive_ids": ["gil"]},
    {"question": "How are files closed?", "answer": "With a with statement.", "positive_ids": ["files"]},
    {"question": "What do generators do?", "answer": "They yield values lazily."},
]


def test_contrastive_loss_is_cross_entropy_over_in_batch_and_hard_negatives():
    torch.manual_seed(0)
    q, p, n = (torch.nn.functional.normalize(torch.randn(s, 8), dim=-1) for s in (3, 3, 2))
    scores = SCALE * (q @ torch.cat([p, n]).T).double().numpy()
    expected = np.mean([np.log(np.exp(s).sum()) - s[i] for i, s in enumerate(scores)])
    assert float(contrastive_loss(q, p, n)) == pytest.approx(expected, rel=1e-5)


def test_hard_negatives_exclude_positives_and_rank_by_score():
    queries = np.array([[1.0, 0.0], [0.0, 1.0]])
    pool = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.5, 0.5]])
    assert mine_hard_negatives(queries, pool, [{0}, {2}], per_query=2) == [[1, 3], [3, 1]]


def test_loss_mask_covers_the_answer_only(tiny_generator_dir):
    from transformers import AutoTokenizer

    from ragrt.decoding.prompt import PromptBuilder
    from ragrt.retrieval.passages import Passage
    from ragrt.export.pack import prompt_spec
    hf = AutoTokenizer.from_pretrained(tiny_generator_dir)
    spec = prompt_spec(hf.chat_template, lambda m: hf.apply_chat_template(m, tokenize=False, add_generation_prompt=True))
    builder = PromptBuilder(spec, hf.backend_tokenizer, budget=400)
    ids, labels = sft_example(builder, "Q?", [Passage("t#0", "T", "passage")], "the answer", eos_id=2, max_answer_tokens=64)
    prompt = builder.build("Q?", [Passage("t#0", "T", "passage")]).ids
    answer = hf.backend_tokenizer.encode("the answer", add_special_tokens=False).ids
    assert ids == prompt + answer + [2]
    assert labels == [IGNORE] * len(prompt) + answer + [2]


def test_losses_from_the_answers_logits_equal_the_whole_sequences(tiny_generator_dir):
    """Logits kept only where they predict labelled tokens give the model's own loss over all of
    them, and the same gradients; sequence_logprobs' sums equal log-softmax over every position."""
    import torch
    from transformers import AutoModelForCausalLM

    from ragrt.export.train.sft import answer_loss, sequence_logprobs
    model = AutoModelForCausalLM.from_pretrained(tiny_generator_dir, dtype=torch.float32).eval()
    rng = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (30,), generator=rng).tolist()
    labels = [IGNORE] * 22 + ids[22:]
    got = answer_loss(model, ids, labels)
    got.backward()
    grad = model.lm_head.weight.grad.clone()
    model.zero_grad()
    want = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
    want.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(grad, model.lm_head.weight.grad)

    examples = [(ids, labels), (ids[:26], [IGNORE] * 19 + ids[19:26])]
    with torch.no_grad():
        sums = sequence_logprobs(model, examples, pad_id=0)
        for (x, y), s in zip(examples, sums):
            logp = torch.log_softmax(model(input_ids=torch.tensor([x])).logits[0, :-1].double(), -1)
            ref = sum(logp[t - 1, x[t]] for t in range(len(x)) if y[t] != IGNORE)
            assert float(s) == pytest.approx(float(ref), abs=1e-4)


def test_block_example_is_the_engine_block_prompt(tiny_generator_dir):
    from dataclasses import replace as dc_replace

    from transformers import AutoTokenizer

    from ragrt.decoding.prompt import PromptBuilder
    from ragrt.export.pack import prompt_spec
    from ragrt.retrieval.passages import Passage
    hf = AutoTokenizer.from_pretrained(tiny_generator_dir)
    spec = prompt_spec(hf.chat_template, lambda m: hf.apply_chat_template(m, tokenize=False, add_generation_prompt=True))
    builder = PromptBuilder(dc_replace(spec, passage="{title}\n{text}"), hf.backend_tokenizer, budget=400)
    passages = [Passage("a#0", "A", "first passage"), Passage("b#0", "B", "the second one")]
    prompt, answer = block_example(builder, "Q?", passages, "the answer", eos_id=2, max_answer_tokens=64)
    assert prompt == builder.build_blocks("Q?", passages)[0] and len(prompt.blocks) == 2
    assert answer == hf.backend_tokenizer.encode("the answer", add_special_tokens=False).ids + [2]


def test_block_loss_trains_what_block_logits_reads(tiny_generator_dir):
    """The loss is the answer's cross-entropy under block_logits (which tests/test_passage_kv.py
    holds to the engine's assembly), and a changed earlier block reaches the answer only through
    the tail, never a later block's own states."""
    from transformers import AutoModelForCausalLM

    from ragrt.decoding.blocks import BlockPrompt
    model = AutoModelForCausalLM.from_pretrained(tiny_generator_dir, dtype=torch.float64).eval()
    rng = np.random.default_rng(0)
    ids = lambda n: tuple(int(t) for t in rng.integers(3, model.config.vocab_size, n))
    prompt = BlockPrompt(ids(5), (ids(6), ids(4)), ids(3))
    answer = list(ids(4))
    with torch.no_grad():
        logits = block_logits(model, prompt, answer[:-1])
        want = torch.nn.functional.cross_entropy(logits[len(prompt.tail) - 1:], torch.tensor(answer))
        torch.testing.assert_close(block_loss(model, prompt, answer), want)
        # Full attention over the same tokens is another prompt: the loss must differ.
        seq = torch.tensor([[*prompt.ids, *answer]])
        full = model(seq).logits[0, len(prompt.ids) - 1:-1]
        assert abs(torch.nn.functional.cross_entropy(full, torch.tensor(answer)) - want) > 1e-4
    loss = block_loss(model, prompt, answer)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_joint_marginal_matches_float64_reference():
    torch.manual_seed(1)
    q = torch.nn.functional.normalize(torch.randn(8), dim=-1)
    d = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    logp_answer = torch.tensor([-3.0, -7.5, -1.25])
    got = float(rag_marginal_nll(q, d, logp_answer, temperature=0.05))
    qn, dn = q.double().numpy(), d.double().numpy()
    prior = np.exp(dn @ qn / 0.05)
    prior /= prior.sum()
    assert got == pytest.approx(-np.log((prior * np.exp(logp_answer.double().numpy())).sum()), rel=1e-6)


@pytest.fixture()
def qa_file(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in QA_ROWS))
    return path


def _config(tiny_corpus, qa_file, out, tiny_encoder_dir, tiny_generator_dir, **kw):
    from ragrt.export.train.finetune import FinetuneConfig
    base = FinetuneConfig(corpus=tiny_corpus, train=qa_file, out=out, encoder=tiny_encoder_dir,
                          generator=tiny_generator_dir, epochs=2, generator_epochs=1, batch_size=2, k=2,
                          grad_accumulation=2, checkpoint_every=1, pool_size=10, max_answer_tokens=8,
                          block_attention=False)
    return replace(base, **kw)


def _weights(path):
    from safetensors.numpy import load_file
    return load_file(str(next(path.glob("*.safetensors"))))


@pytest.mark.parametrize("mode", [{"joint": False}, {"joint": True}, {"block_attention": True}],
                         ids=["sft", "joint", "block-attention"])
def test_tiny_finetune_resumes_to_the_same_weights(tiny_corpus, qa_file, tmp_path, tiny_encoder_dir,
                                                  tiny_generator_dir, monkeypatch, mode):
    from ragrt.export import pack
    from ragrt.export.train import finetune
    cfg = _config(tiny_corpus, qa_file, tmp_path / "a", tiny_encoder_dir, tiny_generator_dir, **mode)
    from_blocks = []
    if cfg.block_attention:
        # Block attention needs passages that render alike at every rank.
        monkeypatch.setattr(pack, "PASSAGE_TEMPLATE", "{title}\n{text}")
        real_block_loss = finetune.block_loss
        monkeypatch.setattr(finetune, "block_loss",
                            lambda *a, repair: from_blocks.append(repair) or real_block_loss(*a, repair=repair))
    finetune.run_finetune(cfg)
    if cfg.block_attention:     # both prompts trained: 3 of the 5 examples read from blocks, 2 plain
        assert from_blocks == [PASSAGE_KV_REPAIR] * 3       # read as the exported bundle's engine reads them
    record = {"block_attention": cfg.block_attention, "block_attention_mix": 0.5,
              "passage_kv_repair": PASSAGE_KV_REPAIR if cfg.block_attention else 0}
    assert finetune.training_record(tmp_path / "a" / "generator") == record
    assert json.loads((tmp_path / "a" / "finetune.json").read_text())["config"]["block_attention"] == str(cfg.block_attention)
    assert finetune.training_record(tiny_generator_dir) == {}

    interrupted = replace(cfg, out=tmp_path / "b")
    real_step = finetune.Trainer.step
    calls = []

    # Block attention is stopped inside the generator phase (after 6 retriever steps), where its examples are drawn.
    crash_at = 8 if cfg.block_attention else 5

    def crash_on_a_step(self, loss):
        calls.append(1)
        if len(calls) == crash_at:
            raise KeyboardInterrupt
        real_step(self, loss)

    monkeypatch.setattr(finetune.Trainer, "step", crash_on_a_step)
    with pytest.raises(KeyboardInterrupt):
        finetune.run_finetune(interrupted)
    monkeypatch.setattr(finetune.Trainer, "step", real_step)
    state = json.loads((tmp_path / "b" / "state.json").read_text())
    assert state["phase"] in ("retriever", "generator") and state["step"] >= 1
    if cfg.block_attention:
        assert state["phase"] == "generator"
    finetune.run_finetune(interrupted)

    for part in ("encoder", "generator"):
        a, b = _weights(tmp_path / "a" / part), _weights(tmp_path / "b" / part)
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{part}/{key}")
    base = _weights(tiny_generator_dir)
    assert any(not np.array_equal(base[k], a[k]) for k in base if k in a), "training changed nothing"
    with pytest.raises(Exception, match="finished run"):
        finetune.run_finetune(cfg)


def test_lora_run_exports(tiny_corpus, qa_file, tmp_path, tiny_encoder_dir, tiny_generator_dir, monkeypatch):
    from ragrt.export import pipeline
    from ragrt.export.train.finetune import run_finetune
    from ragrt.export.pipeline import ExportConfig, run_export
    monkeypatch.setattr(pipeline, "PASSAGE_KV_AGREEMENT", 0.0)     # any agreement would turn passage KV on
    run = run_finetune(_config(tiny_corpus, qa_file, tmp_path / "run", tiny_encoder_dir, tiny_generator_dir,
                               lora=True, max_steps=2, dev=qa_file))
    report = json.loads((run / "finetune.json").read_text())["report"]
    assert 0 <= report["dev_recall@5_before"] <= 1 and 0 <= report["dev_recall@5_after"] <= 1
    assert not any("lora" in k for k in _weights(run / "generator")), "LoRA must be merged before saving"
    bundle = run_export(ExportConfig(corpus=tiny_corpus, out=tmp_path / "bundle", encoder=run / "encoder",
                                     generator=run / "generator", quantize="fp32", parity_prompts=2, max_context=512))
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert "fine-tuned on train.jsonl" in manifest["generator"]["source"]["name"]
    # ... but not for a generator ragrt fine-tuned, without dev answers.
    assert manifest["parity"]["passage_kv"]["trained"] is False and manifest["rag"]["passage_kv"] == "off"


def test_block_attention_refusals(tiny_corpus, qa_file, tmp_path, tiny_encoder_dir, tiny_generator_dir, monkeypatch):
    from ragrt.export import pack
    from ragrt.export.train.finetune import run_finetune
    cfg = _config(tiny_corpus, qa_file, tmp_path / "r", tiny_encoder_dir, tiny_generator_dir, block_attention=True)
    with pytest.raises(UserInputError, match="does not combine with --joint"):
        run_finetune(replace(cfg, joint=True))
    with pytest.raises(UserInputError, match="--block-attention-mix is a share between 0 and 1"):
        run_finetune(replace(cfg, block_attention_mix=1.5))
    monkeypatch.setattr(pack, "PASSAGE_TEMPLATE", "[{n}] {title}\n{text}")
    with pytest.raises(UserInputError, match="passage template numbers passages"):
        run_finetune(cfg)


def test_bad_training_data(tiny_corpus, tmp_path, tiny_encoder_dir, tiny_generator_dir):
    from ragrt.export.train.finetune import run_finetune
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n{"question": 3}\n')
    with pytest.raises(CorpusError, match="bad.jsonl:2"):
        run_finetune(_config(tiny_corpus, bad, tmp_path / "r1", tiny_encoder_dir, tiny_generator_dir))
    none = tmp_path / "none.jsonl"
    none.write_text('{"question": "q", "answer": "a", "positive_ids": ["absent"]}\n')
    with pytest.raises(CorpusError, match="no question has a positive passage"):
        run_finetune(_config(tiny_corpus, none, tmp_path / "r2", tiny_encoder_dir, tiny_generator_dir))


def test_the_budget_ends_a_phase_after_the_last_step_that_fits(tmp_path):
    from ragrt.export.train import finetune
    now = [0.0]
    budget = finetune.Budget(1, spent_before=10.0, clock=lambda: now[0])     # 60 s, 10 of them spent before a resume
    assert budget.limit == 60 - finetune.FINISH_SECONDS
    cfg = finetune.FinetuneConfig(corpus=tmp_path, train=None, out=tmp_path, checkpoint_every=1000, max_minutes=1)
    trainer = finetune.Trainer(tmp_path, finetune.RunState(), {"m": torch.nn.Linear(2, 1)}, 0.1, cfg, budget)
    trainer.progress(100, "test")
    while not trainer.done():
        now[0] += 12.0
        trainer.step(0.0)
    # Steps of 12 s from 10 s spent, in 45 s: the second ends at 34 s, a third would end at 46.
    assert trainer.state.step == 2 and budget.spent() == 34.0
    assert trainer.bar.total == 2                   # the bar's ETA ends where the budget does
    assert finetune.Budget(0, 1e9).left() == float("inf")   # 0: no limit


def test_a_spent_budget_saves_the_models_as_they_are(tiny_corpus, qa_file, tmp_path, tiny_encoder_dir,
                                                    tiny_generator_dir):
    from ragrt.export.train.finetune import run_finetune
    run_finetune(_config(tiny_corpus, qa_file, tmp_path / "r", tiny_encoder_dir, tiny_generator_dir,
                         max_minutes=1e-6))
    report = json.loads((tmp_path / "r" / "finetune.json").read_text())["report"]
    assert report["budget_stopped"] == {"retriever": [0, 6], "generator": [0, 3]}
    assert "total" in report and "generator" not in json.loads((tmp_path / "r" / "finetune.json").read_text())["losses"]
    base, saved = _weights(tiny_generator_dir), _weights(tmp_path / "r" / "generator")
    assert all(np.array_equal(base[k], saved[k]) for k in base if k in saved)
    for bad, match in (({"max_minutes": -1.0}, "--max-minutes must be 0"), ({"precision": "fp8"}, "--precision must be")):
        with pytest.raises(UserInputError, match=match):
            run_finetune(_config(tiny_corpus, qa_file, tmp_path / "x", tiny_encoder_dir, tiny_generator_dir, **bad))
    assert not (tmp_path / "x").exists()
