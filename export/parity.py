"""Parity: do the exported graphs compute what the PyTorch models compute?

Encoder: cosine of ONNX (fp32, int8) embeddings against PyTorch's.
Generator: greedy tokens of ONNX (fp32, int8) against PyTorch's `generate()` on real
prompts built by the engine's own PromptBuilder. Greedy agreement, not logits closeness,
is what tells a user whether the quantized model still says the same thing.
"""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from ragrt.decoding.generator import Generator, greedy, greedy_batch, load_decoder, open_decoder
from ragrt.decoding.decoder import Decoder
from ragrt.decoding.lookup import PromptLookup
from ragrt.retrieval.encoder import TextEncoder, load_tokenizer
from ragrt.bundle.manifest import DraftParity, EncoderParity, GeneratorSpec, GreedyAgreement, PassageKVParity, PromptSpec
from ragrt.decoding.prompt import PromptBuilder
from ragrt.retrieval.passages import Passage, passage_id
from ragrt.runtime.sessions import SessionConfig, create_session

# (question, title, passage): short Python-docs style contexts, so the generator answers
# the way it will in the product.
INVARIANCE_PROMPTS = 8

PARITY_PROMPTS: list[tuple[str, str, str]] = [
    ("How do I copy a list?", "Lists", "To copy a list use list.copy() or the slice a[:]. The copy module's copy.copy() works for any object."),
    ("What does len() return?", "Built-in functions", "len(s) returns the length (the number of items) of an object such as a string, list or dict."),
    ("How do I open a file for reading?", "Reading files", "open(file, mode='r') opens a file and returns a file object. Use a with statement so the file is closed."),
    ("What is a tuple?", "Tuples", "Tuples are immutable sequences, typically used to store collections of heterogeneous data."),
    ("How do I sort a dictionary by value?", "Sorting", "sorted(d.items(), key=lambda kv: kv[1]) returns the items ordered by value."),
    ("What is the GIL?", "Global interpreter lock", "The global interpreter lock ensures that only one thread executes Python bytecode at a time."),
    ("How do I read environment variables?", "os", "os.environ is a mapping of the environment; os.getenv(name, default) returns one variable or the default."),
    ("How can I format a float with two decimals?", "Format strings", "f'{x:.2f}' formats x with two digits after the decimal point."),
    ("What does the pass statement do?", "pass", "pass is a null operation: nothing happens when it executes. It is useful as a placeholder."),
    ("How do I create a virtual environment?", "venv", "python -m venv /path/to/env creates a virtual environment; activate it with its activate script."),
    ("How do I remove duplicates from a list?", "Sets", "list(dict.fromkeys(items)) removes duplicates and keeps the first occurrence order; set(items) loses the order."),
    ("What is a generator?", "Generators", "A generator is a function that uses yield; calling it returns an iterator that produces values lazily."),
    ("How do I measure execution time?", "timeit", "The timeit module measures execution time of small code snippets; time.perf_counter() gives a high-resolution clock."),
    ("What is __init__.py for?", "Packages", "An __init__.py file makes a directory a regular package; its code runs when the package is imported."),
    ("How do I join strings?", "str.join", "str.join(iterable) returns a string which is the concatenation of the strings in the iterable, separated by str."),
    ("How do I handle exceptions?", "Errors", "Use try and except to handle exceptions: the except clause runs when the named exception is raised in the try block."),
    ("What does enumerate do?", "Built-in functions", "enumerate(iterable, start=0) returns pairs of a count and the values from the iterable."),
    ("How do I parse JSON?", "json", "json.loads(s) parses a JSON document from a string; json.load(f) reads it from a file object."),
    ("What is a lambda?", "Lambdas", "A lambda expression creates a small anonymous function: lambda x: x + 1."),
    ("How do I get the current date?", "datetime", "datetime.date.today() returns the current local date; datetime.datetime.now() includes the time."),
    ("How do I reverse a string?", "Slicing", "s[::-1] returns the string reversed, using a slice with step -1."),
    ("What is a decorator?", "Decorators", "A decorator is a function returning another function, applied with the @wrapper syntax."),
    ("How do I check the Python version?", "sys", "sys.version_info holds the version as a tuple; python --version prints it."),
    ("How do I count items?", "collections", "collections.Counter counts hashable items: Counter('abca')['a'] is 2."),
]


def torch_embeddings(checkpoint: Path, texts: list[str], max_length: int, pooling: str = "mean") -> np.ndarray:
    import torch
    from transformers import AutoModel, AutoTokenizer

    from ragrt.export.onnx.graphs import pool
    tok = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModel.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        batch = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        h = model(**batch).last_hidden_state
        return torch.nn.functional.normalize(pool(h, batch["attention_mask"], pooling), dim=-1).numpy()


def encoder_parity(checkpoint: Path, fp32: TextEncoder, int8: TextEncoder, w8a8: TextEncoder | None = None, *,
                   max_length: int, pooling: str = "mean") -> EncoderParity:
    """The w8a8 figures are None without a w8a8 graph (it is built only when a bundle ships it)."""
    texts = [t for q, title, p in PARITY_PROMPTS for t in (q, f"{title}\n{p}")]
    ref = torch_embeddings(checkpoint, texts, max_length, pooling)
    c32, c8 = ((enc.embed_all(texts) * ref).sum(1) for enc in (fp32, int8))
    cw8 = (w8a8.embed_all(texts) * ref).sum(1) if w8a8 is not None else None
    return EncoderParity(fp32_cosine_mean=float(c32.mean()), fp32_cosine_min=float(c32.min()),
                         int8_cosine_mean=float(c8.mean()), int8_cosine_min=float(c8.min()), texts=len(texts),
                         w8a8_cosine_mean=None if cw8 is None else float(cw8.mean()),
                         w8a8_cosine_min=None if cw8 is None else float(cw8.min()))


def parity_prompt_ids(builder: PromptBuilder, n: int) -> list[list[int]]:
    return [builder.build(q, [Passage(passage_id("parity", i), title, p)]).ids
            for i, (q, title, p) in enumerate(PARITY_PROMPTS[:n])]


def torch_greedy(checkpoint: Path, prompts: list[list[int]], spec: GeneratorSpec, max_new_tokens: int) -> list[list[int]]:
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for ids in prompts:
            gen = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                 eos_token_id=list(spec.eos_token_ids), pad_token_id=spec.pad_token_id)
            new = gen[0, len(ids):].tolist()
            out.append([t for t in _until_eos(new, spec.eos_token_ids)])
    return out


def onnx_agreement(model_path: Path, spec: GeneratorSpec, prompts: list[list[int]], reference: list[list[int]],
                   new_tokens: int, decode) -> GreedyAgreement:
    """Free-running greedy agreement, plus teacher-forced top-1 agreement.

    One early flip makes the rest of a greedy answer differ, so prefix agreement alone
    calls a good int8 model broken; teacher forcing scores every position on its own.
    """
    decoder = open_decoder(create_session(model_path, SessionConfig()), replace(spec, batch_invariant=True, prefix_exact=True, drafts_exact=True))
    alone = [list(greedy(decoder, ids, new_tokens)) for ids in prompts]
    prefix, hits, total = [], 0, 0
    for ids, ref, out in zip(prompts, reference, alone):
        n = 0
        while n < min(len(ref), len(out)) and ref[n] == out[n]:
            n += 1
        prefix.append(n / max(len(ref), len(out)) if (ref or out) else 1.0)
        if ref:
            seq = np.array([ids + ref[:-1]])
            logits, _ = decoder.forward(decoder.empty_state(1), seq, np.ones_like(seq), num_logits=len(ref))
            hits += int((logits[0].argmax(-1) == np.array(ref)).sum())
            total += len(ref)
    exact = float(np.mean([a == b for a, b in zip(reference, alone)]))
    return GreedyAgreement(exact, float(np.mean(prefix)), hits / max(total, 1), len(prompts), new_tokens,
                           decode(alone[0]), **exactness(decoder, prompts[:INVARIANCE_PROMPTS], alone, new_tokens))


def exactness(decoder: Decoder, prompts: list[list[int]], alone: list[list[int]], new_tokens: int) -> dict[str, bool]:
    """Whether batching, a cached prefix and drafts each leave `alone` (prompts decoded alone, greedy) as it is.

    Each runs a row in passes of other shapes than a lone one-token step; a graph whose
    kernels round differently by shape (int8 activations, say) can change some tokens.
    `decoder` must be built from a spec that claims all three.
    """
    alone = alone[:len(prompts)]
    logits, state = decoder.prefill(prompts)
    batched = greedy_batch(Generator(decoder, state, logits), new_tokens) == alone
    drafted = [list(greedy(decoder, p, new_tokens, PromptLookup())) for p in prompts] == alone
    decoder.cache_prefix(os.path.commonprefix(prompts)[:-2])
    try:
        prefixed = [list(greedy(decoder, p, new_tokens)) for p in prompts] == alone
    finally:
        decoder.cache_prefix([])
    return {"batch_invariant": batched, "prefix_exact": prefixed, "drafts_exact": drafted}


def _until_eos(tokens: list[int], eos: tuple[int, ...]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[:i]
    return tokens


def shipped_generator(root: Path, spec: GeneratorSpec, prompt: PromptSpec, new_tokens: int) -> tuple:
    """The staged bundle's generator opened as the engine opens it (its step graph too), and its
    prompt builder: what the bundle-time checks (passage KV, drafts) run on, opened once for both."""
    tokenizer = load_tokenizer(Path(root) / spec.tokenizer)
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return (load_decoder(root, spec, SessionConfig()),
            PromptBuilder(prompt, tokenizer, budget=spec.max_context - new_tokens))


def passage_kv_parity(decoder, builder: PromptBuilder, *, trained: bool, prompts: int,
                      new_tokens: int, repair: int) -> PassageKVParity | None:
    """Block mode against full prefill on the shipped graph; None where passage KV is unavailable."""
    from ragrt.decoding.blocks import unavailable
    if unavailable(decoder, builder.spec):
        return None
    share, n = block_agreement(decoder, builder, prompts, new_tokens, repair=repair)
    return PassageKVParity(trained=trained, agreement=round(share, 4), prompts=n, new_tokens=new_tokens, repair=repair)


def block_agreement(decoder, builder: PromptBuilder, n: int, new_tokens: int, *, passages_per_prompt: int = 3,
                    repair: int = 0) -> tuple[float, int]:
    """Passage KV against full prefill: the share of full prefill's greedy tokens that are also
    block mode's top-1, given the same prefix (teacher-forced), over `n` built-in prompts of
    `passages_per_prompt` passages each (the right one at a varying rank). Returns (share, prompts)."""
    from ragrt.decoding.blocks import PassageKV
    kv = PassageKV(decoder, "parity", repair=repair)
    prompts = PARITY_PROMPTS[:n]
    agree = total = 0
    for i, (question, _, _) in enumerate(prompts):
        rows = np.roll([(i + j) % len(PARITY_PROMPTS) for j in range(passages_per_prompt)], i % passages_per_prompt)
        passages = [Passage(passage_id("parity", r), PARITY_PROMPTS[r][1], PARITY_PROMPTS[r][2]) for r in rows]
        prompt, _ = builder.build_blocks(question, passages)
        reference = _until_eos(list(greedy(decoder, prompt.ids, new_tokens)), decoder.spec.eos_token_ids)
        gen = Generator(decoder, passage_kv=kv)
        gen.add_prompts([prompt])
        for token in reference:
            agree += int(gen.logits[0].argmax() == token)
            total += 1
            gen.append(np.array([token], dtype=np.int64))
    return (agree / total if total else 1.0), len(prompts)


def draft_parity(decoder, builder: PromptBuilder, *, prompts: int, new_tokens: int) -> DraftParity:
    """Greedy with prompt-lookup drafts against one token per pass, on the built-in prompts: the
    share of each one-token answer that the drafted answer repeats before they part, averaged."""
    eos = decoder.spec.eos_token_ids
    shares = []
    for ids in parity_prompt_ids(builder, prompts):
        alone = _until_eos(list(greedy(decoder, ids, new_tokens)), eos)
        drafted = _until_eos(list(greedy(decoder, ids, new_tokens, PromptLookup())), eos)
        same = len(os.path.commonprefix([alone, drafted]))
        shares.append(same / max(len(alone), len(drafted), 1))
    return DraftParity(agreement=round(float(np.mean(shares)), 4), prompts=len(shares), new_tokens=new_tokens)
