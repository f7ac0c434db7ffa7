"""The decode loop and the RAG modes on a tiny random llama, against PyTorch and float64 NumPy references."""
import numpy as np
import pytest
from ragrt.decoding.generator import Generator, greedy, greedy_batch, open_decoder
from ragrt.bundle.manifest import GeneratorSpec, ModelSource
from ragrt.decoding.prompt import PromptBuilder
from ragrt.decoding.rag import passage_prior, start
from ragrt.decoding.sampling import DecodingConfig
from ragrt.retrieval.passages import Passage
from ragrt.runtime.sessions import SessionConfig, create_session
from ragrt.export.pack import prompt_spec

MAX_NEW = 12


@pytest.fixture(scope="module", params=["batched", "row-by-row", "packed"])
def decoder(tiny_generator_onnx, request):
    """Every way a batch can run: as one left-padded batch, row by row (int8 bundles), or on a
    packed cache (fused graphs: preallocated buffers, rows prefilled alone and stepped together)."""
    if request.param == "packed":
        path, spec = request.getfixturevalue("tiny_fused_fp32")
        return open_decoder(create_session(path, SessionConfig(threads=1)), spec)
    out, exp = tiny_generator_onnx
    spec = GeneratorSpec(model="model.onnx", tokenizer="tokenizer.json", quantization="fp32",
                         num_layers=exp.num_layers, num_kv_heads=exp.num_kv_heads, head_dim=exp.head_dim,
                         vocab_size=exp.vocab_size, eos_token_ids=tuple(exp.eos_token_ids),
                         pad_token_id=exp.pad_token_id, max_context=512, source=ModelSource("tiny", ""),
                         batch_invariant=request.param == "batched", prefix_exact=request.param == "batched",
                         drafts_exact=request.param == "batched")
    return open_decoder(create_session(out / "model.onnx", SessionConfig(threads=1)), spec)


@pytest.fixture(scope="module")
def builder(tiny_generator_dir, tiny_generator_onnx):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(tiny_generator_dir)
    spec = prompt_spec(hf.chat_template, lambda m: hf.apply_chat_template(m, tokenize=False, add_generation_prompt=True))
    tok = Tokenizer.from_file(str(tiny_generator_onnx[0] / "tokenizer.json"))
    return PromptBuilder(spec, tok, budget=400)


PASSAGES = [Passage("lists#0", "Lists", "Use list.copy() or a slice to copy a list."),
            Passage("json#0", "JSON", "The json module parses JSON documents."),
            Passage("gil#0", "GIL", "The GIL lets one thread run Python bytecode at a time.")]
QUESTION = "How do I copy a list?"


def ref_logprobs(decoder, ids):
    """Uncached: the whole sequence from an empty past, float64 log-softmax of the last position."""
    logits, _ = decoder.forward(decoder.empty_state(1), np.array([ids]), np.ones((1, len(ids)), dtype=np.int64))
    x = logits[0, -1].astype(np.float64)
    return x - (np.log(np.exp(x - x.max()).sum()) + x.max())


def ref_greedy(decoder, ids, max_new):
    out = []
    for _ in range(max_new):
        t = int(ref_logprobs(decoder, ids + out).argmax())
        if t in decoder.spec.eos_token_ids:
            break
        out.append(t)
    return out


def test_prompt_is_the_rendered_chat_template(builder, tiny_generator_dir):
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(tiny_generator_dir)
    prompt = builder.build(QUESTION, PASSAGES[:1])
    user = "Context:\nLists\nUse list.copy() or a slice to copy a list.\n\nQuestion: How do I copy a list?"
    expected = hf.apply_chat_template([{"role": "system", "content": builder.spec.system},
                                       {"role": "user", "content": user}], tokenize=True, add_generation_prompt=True)
    assert prompt.ids == list(expected)


def test_block_layout_holds_the_same_text_with_rank_free_blocks(builder):
    """build_blocks gives build's tokens; each passage's block is the same at every rank."""
    full = builder.build(QUESTION, PASSAGES)
    blocks, truncated = builder.build_blocks(QUESTION, PASSAGES)
    assert not truncated and not full.truncated
    assert blocks.ids == full.ids
    reordered, _ = builder.build_blocks("another question?", PASSAGES[::-1])
    assert reordered.blocks == blocks.blocks[::-1] and reordered.prefix == blocks.prefix
    assert reordered.tail != blocks.tail


def test_blocks_end_on_the_whole_prompts_tokens_where_bpe_merges_the_separator(builder):
    """A byte-level BPE that merges "\n\n" into one token only where no word follows, as SmolLM2's
    does: a block tokenized alone would end on that token, which the whole prompt never has."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["ĊĊ"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, [("Ċ", "Ċ")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    assert tok.encode("a\n\n").ids[-1] == vocab["ĊĊ"] and vocab["ĊĊ"] not in tok.encode("a\n\nb").ids
    merging = PromptBuilder(builder.spec, tok, budget=400)
    full = merging.build(QUESTION, PASSAGES)
    blocks, _ = merging.build_blocks(QUESTION, PASSAGES)
    assert blocks.ids == full.ids
    assert merging.build_blocks("another question?", PASSAGES[::-1])[0].blocks == blocks.blocks[::-1]


def test_onnx_greedy_equals_pytorch_greedy(decoder, builder, tiny_generator_dir):
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_generator_dir).eval()
    for passages in (PASSAGES, PASSAGES[1:2]):
        ids = builder.build(QUESTION, passages).ids
        with torch.no_grad():
            gen = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=list(decoder.spec.eos_token_ids),
                                 pad_token_id=decoder.spec.pad_token_id)
        expected = [t for t in gen[0, len(ids):].tolist()]
        expected = expected[:next((i for i, t in enumerate(expected) if t in decoder.spec.eos_token_ids), len(expected))]
        assert list(greedy(decoder, ids, MAX_NEW)) == expected
        assert len(expected) > 0


def test_kv_cached_equals_uncached(decoder, builder):
    ids = builder.build(QUESTION, PASSAGES).ids
    assert list(greedy(decoder, ids, MAX_NEW)) == ref_greedy(decoder, ids, MAX_NEW)


def test_left_padded_batch_equals_single_rows(decoder, builder):
    prompts = [builder.build(QUESTION, [p]).ids for p in PASSAGES]
    assert len({len(p) for p in prompts}) > 1, "the rows must differ in length to exercise padding"
    logits, state = decoder.prefill(prompts)
    batch = greedy_batch(Generator(decoder, state, logits), MAX_NEW)
    for row, ids in enumerate(prompts):
        single, _ = decoder.prefill([ids])
        np.testing.assert_allclose(logits[row], single[0], atol=1e-4)
        assert batch[row] == ref_greedy(decoder, ids, MAX_NEW)


def test_stopping_the_stream_stops_decoding(decoder, builder):
    ids = builder.build(QUESTION, PASSAGES).ids
    counting = open_decoder(CountingSession(decoder.session), decoder.spec)
    for _ in greedy(counting, ids, MAX_NEW):
        break
    assert counting.session.calls == 1


def test_rag_token_matches_float64_reference(decoder, builder):
    prior = passage_prior([0.9, 0.7, 0.5], temperature=0.1)
    run = start("token", decoder, builder, QUESTION, PASSAGES, prior, DecodingConfig(max_new_tokens=MAX_NEW))
    tokens = list(run.tokens)

    prompts = [builder.build(QUESTION, [p]).ids for p in PASSAGES]
    out, total = [], 0.0
    for _ in range(MAX_NEW):
        mixed = sum(prior[c] * np.exp(ref_logprobs(decoder, prompts[c] + out)) for c in range(len(prompts)))
        t = int(mixed.argmax())
        total += float(np.log(mixed[t]))
        if t in decoder.spec.eos_token_ids:
            break
        out.append(t)
    assert tokens == out
    assert run.log_prob == pytest.approx(total, abs=1e-4)


def test_rag_sequence_matches_float64_reference(decoder, builder):
    prior = passage_prior([0.9, 0.8, 0.75], temperature=0.1)
    run = start("sequence", decoder, builder, QUESTION, PASSAGES, prior, DecodingConfig(max_new_tokens=MAX_NEW))
    tokens = list(run.tokens)

    prompts = [builder.build(QUESTION, [p]).ids for p in PASSAGES]
    eos = decoder.spec.eos_token_ids[0]
    best, best_p = None, -1.0
    for cand in dict.fromkeys(tuple(ref_greedy(decoder, p, MAX_NEW)) for p in prompts):
        scored = list(cand) + ([eos] if len(cand) < MAX_NEW else [])
        p_marginal = 0.0
        for c, ids in enumerate(prompts):
            p = 1.0
            for i, t in enumerate(scored):
                p *= np.exp(ref_logprobs(decoder, ids + scored[:i])[t])
            p_marginal += prior[c] * p
        if p_marginal > best_p:
            best, best_p = list(cand), p_marginal
    assert tokens == best
    assert run.log_prob == pytest.approx(np.log(best_p), abs=1e-4)


def test_passage_prior_is_a_softmax():
    p = passage_prior([0.5, 0.4], temperature=0.1)
    assert p.sum() == pytest.approx(1.0)
    assert p[0] / p[1] == pytest.approx(np.exp(1.0))


class CountingSession:
    """Counts forward passes through the wrapped onnxruntime session."""

    def __init__(self, session):
        self.session, self.calls = session, 0

    def run(self, *args, **kwargs):
        self.calls += 1
        return self.session.run(*args, **kwargs)

    def run_with_iobinding(self, *args, **kwargs):
        self.calls += 1
        return self.session.run_with_iobinding(*args, **kwargs)

    def io_binding(self):
        return self.session.io_binding()

    def get_providers(self):
        return self.session.get_providers()


@pytest.mark.parametrize("max_draft,compact_after", [(1, 64), (3, 64), (8, 64), (8, 2)])
def test_prompt_lookup_keeps_greedy_output_in_fewer_passes(decoder, max_draft, compact_after, monkeypatch):
    """Rejected drafts stay in the cache masked out, and are cut out at `COMPACT_AFTER`."""
    import ragrt.decoding.decoder as decoder_module
    from ragrt.decoding.lookup import PromptLookup
    monkeypatch.setattr(decoder_module, "COMPACT_AFTER", compact_after)
    rng = np.random.default_rng(max_draft)
    counting = CountingSession(decoder.session)
    speculative = open_decoder(counting, decoder.spec)
    saved = 0
    for _ in range(6):
        # Repeated chunks give the lookup something to find; the random tiny model decides
        # whether the drafts are right.
        chunk = rng.integers(3, decoder.spec.vocab_size, 6).tolist()
        prompt = chunk * 3 + rng.integers(3, decoder.spec.vocab_size, 4).tolist() + chunk[:3]
        plain = list(greedy(decoder, prompt, 40))
        counting.calls = 0
        fast = list(greedy(speculative, prompt, 40, lookup=PromptLookup(max_draft=max_draft, min_ngram=1)))
        assert fast == plain
        saved += len(plain) - counting.calls
    assert saved > 0          # some drafts were accepted, so some passes were saved


@pytest.mark.parametrize("options", [dict(repetition_penalty=1.3), dict(no_repeat_ngram_size=3),
                                     dict(repetition_penalty=1.2, no_repeat_ngram_size=4, min_new_tokens=30)])
def test_prompt_lookup_keeps_penalized_greedy_output(decoder, options):
    """Drafts are checked against the chooser's own pick, penalties and bans included, so a
    deterministic decoding gives the same tokens with drafts as one token per pass."""
    from ragrt.decoding.generator import generate
    from ragrt.decoding.lookup import PromptLookup
    rng = np.random.default_rng(7)
    counting = CountingSession(decoder.session)
    speculative = open_decoder(counting, decoder.spec)
    config = DecodingConfig(max_new_tokens=40, **options)
    saved = 0
    for _ in range(6):
        chunk = rng.integers(3, decoder.spec.vocab_size, 6).tolist()
        prompt = chunk * 3 + rng.integers(3, decoder.spec.vocab_size, 4).tolist() + chunk[:3]
        plain = list(generate(decoder, prompt, config))
        counting.calls = 0
        fast = list(generate(speculative, prompt, config, PromptLookup(max_draft=4, min_ngram=1)))
        assert fast == plain
        saved += len(plain) - counting.calls
    assert saved > 0


def test_prompt_lookup_drafts_what_followed_the_latest_match():
    from ragrt.decoding.lookup import PromptLookup
    lookup = PromptLookup(max_draft=3, max_ngram=2, min_ngram=1)
    assert lookup.propose([1, 2, 3, 4, 5, 1, 2, 9, 9, 1, 2]) == [9, 9, 1]
    assert lookup.propose([7, 8, 5, 6, 8]) == [5, 6, 8]          # bigram (6, 8) is new; unigram 8 matches
    assert PromptLookup(min_ngram=2).propose([7, 8, 5, 6, 8]) == []
    assert lookup.propose([4]) == []


def test_cached_prefix_keeps_greedy_output(decoder, builder):
    """The fixed instruction's keys and values, computed once, stand in for its prefill."""
    prefix = builder.fixed_prefix()
    prompts = [builder.build(q, [p]).ids for q, p in zip(["Why?", QUESTION, "GIL?"], PASSAGES)]
    assert len(prefix) > 4 and all(p[:len(prefix)] == prefix for p in prompts)
    plain = [list(greedy(decoder, p, MAX_NEW)) for p in prompts]
    counting = open_decoder(CountingSession(decoder.session), decoder.spec)
    counting.cache_prefix(prefix)
    assert (counting.prefix is not None) == decoder.spec.prefix_exact
    assert [list(greedy(counting, p, MAX_NEW)) for p in prompts] == plain
    logits, state = counting.prefill(prompts)
    assert greedy_batch(Generator(counting, state, logits), MAX_NEW) == plain
    assert list(greedy(counting, prefix[:3], MAX_NEW)) == list(greedy(decoder, prefix[:3], MAX_NEW))


class ShapeNoiseSession(CountingSession):
    """Rounds like a kernel that depends on the batch shape: logits move when rows share a pass."""

    def run(self, names, feed):
        out = self.session.run(names, feed)
        ids = feed["input_ids"]
        if ids.shape[0] > 1:
            out[0] = out[0] + np.random.default_rng(ids.size).normal(0, 5, out[0].shape).astype(out[0].dtype)
        return out


def test_parity_measures_exactness(decoder, builder):
    from ragrt.export.parity import exactness
    if decoder.spec.cache != "masked" or not decoder.spec.batch_invariant:
        pytest.skip("one masked, batched decoder is enough to check the measurement")
    prompts = [builder.build(q, [p]).ids for q, p in zip(["Why?", QUESTION, "GIL?"], PASSAGES)]
    alone = [list(greedy(decoder, p, MAX_NEW)) for p in prompts]
    assert exactness(decoder, prompts, alone, MAX_NEW) == {
        "batch_invariant": True, "prefix_exact": True, "drafts_exact": True}
    noisy = open_decoder(ShapeNoiseSession(decoder.session), decoder.spec)
    assert exactness(noisy, prompts, alone, MAX_NEW)["batch_invariant"] is False
