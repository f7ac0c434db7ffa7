"""Generation speed: ragrt's decoder against every peer engine that installs here.

One command, every engine, side by side (issue 4). All engines get the same token ids: one
chat prompt of --prompt-tokens tokens (the bundle's chat template around passages of the
bundle's corpus, tokenized once with the bundle's tokenizer), --new-tokens greedy tokens with
no EOS stop, --threads threads. Each engine runs in its own subprocess, one after the other,
so engines never share memory and peak RSS is that subprocess's ru_maxrss (imports included).
Each measurement is the median of --runs after one dropped warm-up run. With --rounds R the
whole sequence runs R times, each round starting one engine further down the list, and each
figure is the median over rounds (the JSON keeps every round). This machine has slow stretches
of seconds to minutes in which two busy threads get less than two cores' worth of work done
(every multi-threaded engine alike); rounds spread each engine across them, and each target
also says in how many rounds it held, ragrt's round against the reference's same round.

    python benchmarks/generation.py --bundle B8 --bundle B4 [--engines ...] [--runs 5]
        [--json gen.json] [--markdown gen.md] [--plot gen.png]

Measured per engine:
  ttft_ms            prompt in, first token out, batch 1
  decode_tok_s_b1    (new_tokens - 1) / (time after the first token), batch 1
  decode_tok_s_b8    the same over the prompt x8 (--batch), tokens of all streams summed
  peak_rss_mb        the engine subprocess's peak resident memory
  greedy_match       leading greedy tokens equal to PyTorch fp32's (quantized engines may
                     differ; reported, never a failure)

Engines (--engines takes a comma-separated subset of these ids; "ragrt" means every --bundle):
  ragrt-<q>          each --bundle, through the public decoder API (prefill / step)
  ragrt-<q>-drafts   with --drafts: the same bundle through the engine's generate loop with
                     prompt-lookup drafts (tokens may differ from plain greedy where the bundle's
                     drafts are not exact; `ragrt info` shows whether it uses them)
  pytorch            transformers fp32 generate()
  optimum-fp32       optimum ORTModelForCausalLM, fp32 export
  optimum-int8       the same, onnxruntime quantize_dynamic (QInt8, per channel, reduce_range)
  optimum-int4       the same, MatMulNBits int4 (blocks of 32, symmetric, int8 compute)
  genai-fp32         onnxruntime-genai, its model builder -p fp32 -e cpu
  genai-int4         onnxruntime-genai, its model builder -p int4 -e cpu
  llamacpp-q4_1      llama-cpp-python, the packaged SmolLM2 Q4_1 GGUF
  llamacpp-q8_0      llama-cpp-python, a Q8_0 GGUF requantized from it by llama.cpp
  ct2-int8           CTranslate2, int8 conversion of the checkpoint

The peers run the HF checkpoint the bundle was exported from (the packaged SmolLM2 GGUF,
converted and cached by `ragrt export`), or --checkpoint DIR. Their artefacts (ONNX exports,
builder outputs, CTranslate2 and GGUF conversions) are built once and cached under
~/.cache/ragrt/bench/<name>-<hash of the checkpoint>/. An engine that is not installed or
fails is reported as "not available: <reason>"; the run goes on.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

QUESTION = "How do I remove duplicates from a list while keeping the order?"

# id -> (label, pip package that provides it)
PEERS = {
    "pytorch": ("transformers PyTorch fp32 generate()", "torch transformers"),
    "optimum-fp32": ("optimum ORTModelForCausalLM fp32", "optimum-onnx"),
    "optimum-int8": ("optimum ORT int8 (quantize_dynamic, reduce_range)", "optimum-onnx"),
    "optimum-int4": ("optimum ORT int4 (MatMulNBits)", "optimum-onnx"),
    "genai-fp32": ("onnxruntime-genai fp32", "onnxruntime-genai"),
    "genai-int4": ("onnxruntime-genai int4", "onnxruntime-genai"),
    "llamacpp-q4_1": ("llama.cpp Q4_1 (llama-cpp-python)", "llama-cpp-python"),
    "llamacpp-q8_0": ("llama.cpp Q8_0 (llama-cpp-python)", "llama-cpp-python"),
    "ct2-int8": ("CTranslate2 int8", "ctranslate2"),
}
BASELINE = "pytorch"
GENAI_INT4 = "genai-int4"
CT2_INT8 = "ct2-int8"
# Bump to rebuild the cached artefacts after changing how they are made.
RECIPE = "bench-v1"


# ---------------------------------------------------------------------------------------------
# The prompt

def build_prompt(bundle: str, prompt_tokens: int, threads: int) -> tuple[list[int], int]:
    """Exactly `prompt_tokens` ids if the passages allow (else the longest under it), and the
    bundle's EOS id. Passages are the bundle's first ones, repeated if the corpus is small."""
    from ragrt import Engine
    from ragrt.decoding.prompt import PromptBuilder
    engine = Engine.open(bundle, device="cpu", threads=threads)
    store = engine.retriever.store
    n = min(len(store), 64)
    passages = [store.get(i % n) for i in range(64)]
    best: list[int] = []
    for budget in range(prompt_tokens, prompt_tokens + 64):
        builder = PromptBuilder(engine.manifest.prompt, engine.tokenizer, budget=budget)
        ids = builder.build(QUESTION, passages).ids
        if not best or (len(ids) <= prompt_tokens and len(ids) > len(best)):
            best = ids                               # else a budget under the template's own length
        if len(ids) >= prompt_tokens:
            break
    return best, int(engine.manifest.generator.eos_token_ids[0])


def build_rag_prompt(bundle: str, question: str, k: int, threads: int) -> tuple[list[int], int, dict]:
    """The real RAG prompt: `question`'s top k passages retrieved from the bundle, in the block
    layout passage KV reuses (its text is the full prompt's). Returns every engine's token ids,
    the EOS id, and the layout for ragrt's passage KV engines."""
    from ragrt import Engine
    engine = Engine.open(bundle, device="cpu", threads=threads)
    p = engine.prepare(question, k=k)
    blocks, _ = p.builder.build_blocks(p.question, p.passages)
    layout = {"prefix": list(blocks.prefix), "blocks": [list(b) for b in blocks.blocks], "tail": list(blocks.tail)}
    return blocks.ids, int(engine.manifest.generator.eos_token_ids[0]), layout


# ---------------------------------------------------------------------------------------------
# Timing, shared by every engine: run(batch) -> (first-token time, end time, tokens of row 0)

def measure(run, *, batch: int, new_tokens: int, runs: int) -> dict:
    ttft, decode, total, tokens, rows_agree = [], [], [], None, True
    for i in range(runs + 1):                        # the first run warms up and is dropped
        t_first, t_end, rows = run(batch)
        rows = [[int(t) for t in r] for r in rows]
        if len(rows) != batch or any(len(r) != new_tokens for r in rows):
            raise RuntimeError(f"expected {batch} x {new_tokens} tokens, got {[len(r) for r in rows]}")
        rows_agree &= all(r == rows[0] for r in rows)
        tokens = rows[0]
        if i:
            ttft.append(t_first)
            decode.append(batch * (new_tokens - 1) / max(t_end - t_first, 1e-9))
            total.append(t_end)
    return {"ttft_ms": statistics.median(ttft) * 1e3, "decode_tok_s": statistics.median(decode),
            "total_ms_p50": statistics.median(total) * 1e3, "total_ms_p95": _p95(total) * 1e3,
            "tokens": tokens, "rows_agree": rows_agree}


def _p95(values: list[float]) -> float:
    """The 95th percentile, interpolated (numpy's default), without importing numpy here."""
    v = sorted(values)
    x = 0.95 * (len(v) - 1)
    lo = int(x)
    return v[lo] + (v[min(lo + 1, len(v) - 1)] - v[lo]) * (x - lo)


class Clock:
    """Timestamps of a generation: start, then one mark per generated step."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.marks: list[float] = []

    def mark(self) -> None:
        self.marks.append(time.perf_counter() - self.t0)

    def first_and_end(self) -> tuple[float, float]:
        return self.marks[0], self.marks[-1]


# ---------------------------------------------------------------------------------------------
# Engines: each `load_<kind>` returns run(batch) for the worker subprocess

def load_ragrt(spec: dict):
    import numpy as np
    from ragrt import Engine
    from ragrt.decoding.blocks import BlockCache, BlockPrompt
    from ragrt.decoding.generator import generate
    from ragrt.decoding.lookup import PromptLookup
    from ragrt.decoding.sampling import DecodingConfig
    engine = Engine.open(spec["bundle"], device="cpu", threads=spec["threads"])
    decoder = engine.decoder
    prompt, n = spec["prompt"], spec["new_tokens"]
    reuse = spec.get("passage_kv")         # None: full prefill; "hit": blocks cached; "miss": none cached
    if reuse and engine.passage_kv is None:
        raise RuntimeError(f"no passage KV for this bundle: {engine.passage_kv_unavailable}")
    blocks = BlockPrompt(**{k: tuple(map(tuple, v)) if k == "blocks" else tuple(v)
                            for k, v in spec["blocks"].items()}) if reuse else None

    def prefill(batch):
        if reuse is None:
            return decoder.prefill([prompt] * batch)
        if reuse == "miss":                # the prefix stays cached, as in a running server
            engine.passage_kv.cache = BlockCache(engine.passage_kv.cache.budget)
        return engine.passage_kv.prefill([blocks] * batch)   # "hit": the warm-up run cached them

    def run(batch):
        clock = Clock()
        logits, state = prefill(batch)
        token = np.asarray(logits).argmax(-1)
        clock.mark()
        out = [token]
        for _ in range(n - 1):                       # no EOS stop: every engine makes the same count
            logits, state = decoder.step(state, token)
            token = np.asarray(logits).argmax(-1)
            out.append(token)
        clock.mark()
        return (*clock.first_and_end(), np.stack(out, axis=1))

    def run_drafting(batch):
        """The engine's own loop with prompt-lookup drafts (what `ask` runs where the bundle turns them
        on): greedy, EOS banned until the count, so it makes as many tokens as the other engines."""
        if batch > 1:
            raise NotImplementedError("prompt-lookup drafts decode one row")
        clock, out = Clock(), []     # select() pairs drafts with full prefill or a hit, never a miss
        config = DecodingConfig(max_new_tokens=n, min_new_tokens=n)
        for token in generate(decoder, blocks if reuse else prompt, config, PromptLookup(),
                              passage_kv=engine.passage_kv if reuse else None):
            out.append(token)
            clock.mark()
        return (*clock.first_and_end(), np.array([out]))
    return run_drafting if spec.get("drafts") else run


def _hf_generate(model, spec: dict):
    """generate() of transformers or optimum, greedy, exactly new_tokens, timed by a streamer."""
    import torch
    from transformers.generation.streamers import BaseStreamer
    n = spec["new_tokens"]

    class Marks(BaseStreamer):
        def __init__(self):
            self.clock, self.calls = Clock(), 0

        def put(self, value):
            self.calls += 1
            if self.calls > 1:                       # the first call is the prompt
                self.clock.mark()

        def end(self):
            pass

    def run(batch):
        ids = torch.tensor([spec["prompt"]] * batch)
        streamer = Marks()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, num_beams=1, pad_token_id=spec["eos"], streamer=streamer)
        return (*streamer.clock.first_and_end(), out[:, ids.shape[1]:].tolist())
    return run


def load_pytorch(spec: dict):
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(spec["threads"])
    model = AutoModelForCausalLM.from_pretrained(spec["checkpoint"], dtype=torch.float32).eval()
    return _hf_generate(model, spec)


def load_optimum(spec: dict):
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM
    torch.set_num_threads(spec["threads"])
    so = ort.SessionOptions()
    so.intra_op_num_threads = spec["threads"]
    so.inter_op_num_threads = 1
    model = ORTModelForCausalLM.from_pretrained(spec["artefact"], session_options=so, use_cache=True,
                                                provider="CPUExecutionProvider")
    return _hf_generate(model, spec)


def load_genai(spec: dict):
    import numpy as np
    import onnxruntime_genai as og
    config = og.Config(spec["artefact"])
    config.clear_providers()
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": spec["threads"], "inter_op_num_threads": 1}}}}))
    model = og.Model(config)
    prompt, n = spec["prompt"], spec["new_tokens"]
    length = len(prompt) + n

    def run(batch):
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=length, min_length=length, batch_size=batch)
        clock = Clock()
        gen = og.Generator(model, params)
        gen.append_tokens(np.array([prompt] * batch, dtype=np.int32))
        out = []
        for _ in range(n):                           # the first call only picks from the prompt's logits
            gen.generate_next_token()
            out.append(np.array(gen.get_next_tokens()))
            if len(out) == 1:
                clock.mark()
        clock.mark()
        return (*clock.first_and_end(), np.stack(out, axis=1))
    return run


def load_llamacpp(spec: dict):
    from llama_cpp import Llama
    prompt, n = spec["prompt"], spec["new_tokens"]
    llm = Llama(model_path=spec["artefact"], n_ctx=len(prompt) + n + 16, n_batch=512, n_threads=spec["threads"],
                n_threads_batch=spec["threads"], verbose=False)

    def run(batch):
        if batch != 1:
            raise NotImplementedError("llama-cpp-python's Llama API decodes one sequence at a time")
        llm.reset()                                  # else generate() reuses the cached prompt prefix
        clock = Clock()
        out = []
        for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(token)
            clock.mark()
            if len(out) == n:                        # generate() never stops on EOS by itself
                break
        return (clock.marks[0], clock.marks[-1], [out])
    return run


def load_ct2(spec: dict):
    import ctranslate2
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(Path(spec["checkpoint"]) / "tokenizer.json"))
    words = [tok.id_to_token(i) for i in spec["prompt"]]
    gen = ctranslate2.Generator(spec["artefact"], device="cpu", compute_type="int8",
                                intra_threads=spec["threads"], inter_threads=1)
    n = spec["new_tokens"]

    def run(batch):
        clock = Clock()
        seen = set()

        def step(result):
            if result.step not in seen:              # one callback per row per step
                seen.add(result.step)
                if result.step == 0:
                    clock.mark()
            return False

        res = gen.generate_batch([words] * batch, max_length=n, min_length=n, sampling_topk=1,
                                 include_prompt_in_result=False, callback=step)
        clock.mark()
        return (*clock.first_and_end(), [r.sequences_ids[0] for r in res])
    return run


LOADERS = {"ragrt": load_ragrt, "pytorch": load_pytorch, "optimum": load_optimum, "genai": load_genai,
           "llamacpp": load_llamacpp, "ct2": load_ct2}


def kind_of(engine_id: str) -> str:
    return engine_id.split("-")[0]


# ---------------------------------------------------------------------------------------------
# Peer artefacts, built once per checkpoint and cached

def prepare(engine_id: str, checkpoint: Path) -> str | None:
    """The artefact path the engine loads (None for PyTorch, which loads the checkpoint)."""
    from ragrt.export.cache import cached_dir, content_key
    key = None

    def cached(name: str, build) -> Path:
        nonlocal key
        key = key or content_key(checkpoint, RECIPE)
        return cached_dir("bench", f"{name}-{key}", build)

    if engine_id == "pytorch":
        import torch, transformers  # noqa: F401,E401  (availability)
        return None
    if engine_id.startswith("optimum-"):
        import optimum.onnxruntime  # noqa: F401
        fp32 = cached("optimum-fp32", lambda tmp: _optimum_export(checkpoint, tmp))
        if engine_id == "optimum-fp32":
            return str(fp32)
        q = engine_id.split("-")[1]
        return str(cached(f"optimum-{q}", lambda tmp: _optimum_quantize(fp32, tmp, q)))
    if engine_id.startswith("genai-"):
        import onnxruntime_genai  # noqa: F401
        q = engine_id.split("-")[1]
        return str(cached(f"genai-{q}", lambda tmp: _genai_build(checkpoint, tmp, q)))
    if engine_id.startswith("llamacpp-"):
        import llama_cpp  # noqa: F401
        q4 = _packaged_gguf()
        if engine_id == "llamacpp-q4_1":
            return str(q4)
        return str(cached("gguf-q8_0", lambda tmp: _gguf_q8(q4, tmp)) / "model.Q8_0.gguf")
    if engine_id == "ct2-int8":
        import ctranslate2  # noqa: F401
        return str(cached("ct2-int8", lambda tmp: _ct2_convert(checkpoint, tmp)))
    raise ValueError(f"unknown engine {engine_id}")


def _optimum_export(checkpoint: Path, out: Path) -> None:
    from optimum.exporters.onnx import main_export
    main_export(str(checkpoint), output=str(out), task="text-generation-with-past", do_validation=False)


def _optimum_quantize(fp32: Path, out: Path, q: str) -> None:
    import shutil
    for f in fp32.iterdir():                         # config, generation config, tokenizer
        if f.is_file() and not f.name.startswith("model.onnx") and not f.name.startswith("."):
            shutil.copy2(f, out / f.name)
    if q == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic
        # reduce_range: 7-bit weights; plain QInt8 overflows the u8 x s8 AVX2 kernels into garbage.
        quantize_dynamic(str(fp32 / "model.onnx"), str(out / "model.onnx"), weight_type=QuantType.QInt8,
                         per_channel=True, reduce_range=True, op_types_to_quantize=["MatMul"])
    elif q == "int4":
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
        quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32 / "model.onnx")), bits=4, block_size=32,
                                         is_symmetric=True, accuracy_level=4)
        quantizer.process()
        quantizer.model.save_model_to_file(str(out / "model.onnx"), use_external_data_format=False)
    else:
        raise ValueError(q)


def _genai_build(checkpoint: Path, out: Path, q: str) -> None:
    # export/onnx/genai_build.py runs the builder under our transformers 4.57.
    cmd = [sys.executable, "-m", "ragrt.export.onnx.genai_build", "-i", str(checkpoint), "-o", str(out / "model"),
           "-p", q, "-e", "cpu", "-c", str(out / "hf-cache")]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"the model builder failed: {tail[0]}")
    for f in (out / "model").iterdir():
        f.rename(out / f.name)
    import shutil
    shutil.rmtree(out / "model")
    shutil.rmtree(out / "hf-cache", ignore_errors=True)


def _packaged_gguf() -> Path:
    import importlib.util
    from ragrt.export.models import SMOLLM2_GGUF, SMOLLM2_PACKAGE
    # Never imported: the package's own imports pull in llama.cpp bindings.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if not spec or not spec.submodule_search_locations:
        raise RuntimeError(f"{SMOLLM2_PACKAGE} is not installed")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise RuntimeError(f"{path} is missing")
    return path


def _gguf_q8(q4: Path, out: Path) -> None:
    """llama.cpp's own quantizer, Q4_1 -> Q8_0: the same (Q4_1-derived) weights every peer runs."""
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    params.allow_requantize = True
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(q4).encode(), str(out / "model.Q8_0.gguf").encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize returned {rc}")


def _ct2_convert(checkpoint: Path, out: Path) -> None:
    import ctranslate2
    out.rmdir()                                      # the converter wants to create it
    ctranslate2.converters.TransformersConverter(str(checkpoint)).convert(str(out), quantization="int8")


# ---------------------------------------------------------------------------------------------
# The worker subprocess: prepare an engine's artefact, or load it and measure

def worker(args) -> None:
    spec = json.loads(Path(args._spec).read_text())
    if args._worker == "prepare":
        result = {"artefact": prepare(spec["engine"], Path(spec["checkpoint"]))}
    elif args._worker == "rag_prompt":
        prompt, eos, layout = build_rag_prompt(spec["bundle"], spec["question"], spec["k"], spec["threads"])
        result = {"prompt": prompt, "eos": eos, "layout": layout}
    else:
        import resource
        run = LOADERS[kind_of(spec["engine"])](spec)
        load_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        b1 = measure(run, batch=1, new_tokens=spec["new_tokens"], runs=spec["runs"])
        try:
            b8 = (measure(run, batch=spec["batch"], new_tokens=spec["new_tokens"], runs=spec["runs"])
                  if spec["batch"] > 1 else {"error": "not measured (--batch 1)"})
        except NotImplementedError as e:
            b8 = {"error": str(e)}
        result = {"ttft_ms": b1["ttft_ms"], "decode_tok_s_b1": b1["decode_tok_s"],
                  "total_ms_p50": b1["total_ms_p50"], "total_ms_p95": b1["total_ms_p95"],
                  "decode_tok_s_b8": b8.get("decode_tok_s"), "ttft_ms_b8": b8.get("ttft_ms"),
                  "b8_note": b8.get("error"), "b8_rows_agree": b8.get("rows_agree"),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "load_rss_mb": load_rss, "tokens": b1["tokens"]}
    Path(args._out).write_text(json.dumps(result))


def call_worker(phase: str, spec: dict, timeout: float) -> dict:
    """Runs one phase in a fresh interpreter; {"status": "not available: ..."} when it fails."""
    with tempfile.TemporaryDirectory(prefix="ragrt-bench-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]),
                   TOKENIZERS_PARALLELISM="false")
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", phase, "--_spec", str(spec_path),
               "--_out", str(out_path)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
        except subprocess.TimeoutExpired:
            return {"status": f"not available: {phase} ran past {timeout:.0f} s"}
        if done.returncode != 0 or not out_path.is_file():
            return {"status": f"not available: {phase} failed: {_last_error(done.stderr or done.stdout)}"}
        return json.loads(out_path.read_text())


def _last_error(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    for line in reversed(lines):                     # the exception line of a traceback
        if "Error" in line or "error" in line or "Exception" in line:
            if line.startswith("ModuleNotFoundError") or line.startswith("ImportError"):
                return line + " (not installed)"
            return line[:300]
    return (lines[-1] if lines else "no output")[:300]


# ---------------------------------------------------------------------------------------------
# Reports

def label(results: dict, eid: str) -> str:
    return results["engines"][eid]["label"]


def ratio(a, b) -> float | None:
    return a / b if a and b else None


def ratios(results: dict) -> None:
    """Adds vs_pytorch and vs_genai_int4 ratios (speed: >1 is faster) to each engine."""
    engines = results["engines"]
    for ref_id, key in ((BASELINE, "vs_pytorch"), (GENAI_INT4, "vs_genai_int4")):
        ref = engines.get(ref_id, {})
        for r in engines.values():
            if r["status"] != "ok" or ref.get("status") != "ok":
                r[key] = None
                continue
            r[key] = {"ttft": ratio(ref["ttft_ms"], r["ttft_ms"]),
                      "decode_b1": ratio(r["decode_tok_s_b1"], ref["decode_tok_s_b1"]),
                      "decode_b8": ratio(r["decode_tok_s_b8"], ref["decode_tok_s_b8"])}


def acceptance(results: dict) -> list[tuple[str, bool | None, str]]:
    """Issue 4's targets for each ragrt engine: (what, passed or None if unmeasured, figures).
    Passed compares medians over rounds; the figures add in how many rounds the target held."""
    e = results["engines"]
    ok = {k: v for k, v in e.items() if v["status"] == "ok"}
    checks = []
    for rid, r in ok.items():
        if not rid.startswith("ragrt") or "-kv-" in rid:
            continue
        name = r["label"]

        def check(what, ref_id, mine, theirs, ge, factor=1.0):
            ref = ok.get(ref_id)
            if ref is None or r.get(mine) is None or ref.get(theirs) is None:
                checks.append((f"{name}: {what}", None, f"{ref_id} not measured"))
                return
            a, b = r[mine], ref[theirs] * factor
            held = [x[mine] >= y[theirs] * factor if ge else x[mine] <= y[theirs] * factor
                    for x, y in zip(r.get("rounds", []), ref.get("rounds", []))
                    if x.get(mine) is not None and y.get(theirs) is not None]
            rounds = f"; held in {sum(held)} of {len(held)} rounds" if len(held) > 1 else ""
            checks.append((f"{name}: {what}", a >= b if ge else a <= b, f"{a:.1f} vs {b:.1f}{rounds}"))

        check("decode batch 1 >= onnxruntime-genai int4", GENAI_INT4, "decode_tok_s_b1", "decode_tok_s_b1", True)
        check("decode batch 1 >= 3x PyTorch", BASELINE, "decode_tok_s_b1", "decode_tok_s_b1", True, 3.0)
        check("TTFT <= CTranslate2 int8", CT2_INT8, "ttft_ms", "ttft_ms", False)
        if results["batch"] > 1:
            check(f"decode batch {results['batch']} >= onnxruntime-genai int4", GENAI_INT4, "decode_tok_s_b8",
                  "decode_tok_s_b8", True)
    return checks + passage_kv_targets(ok)


def passage_kv_targets(ok: dict) -> list[tuple[str, bool, str]]:
    """Issue 18's targets for each bundle measured with passage KV: against its own full prefill
    and against the fastest peer on the same prompt (medians over rounds)."""
    peers = [r for k, r in ok.items() if not k.startswith("ragrt")]
    checks = []
    for rid, r in ok.items():
        if "-kv-" not in rid or rid.split("-kv-")[0] not in ok:
            continue
        full = ok[rid.split("-kv-")[0]]
        if rid.endswith("-kv-miss"):
            checks.append((f"{r['label']}: TTFT <= 1.15x full prefill", r["ttft_ms"] <= 1.15 * full["ttft_ms"],
                           f"{r['ttft_ms']:.0f} vs {full['ttft_ms']:.0f} ms ({r['ttft_ms'] / full['ttft_ms']:.2f}x)"))
            continue
        checks.append((f"{r['label']}: TTFT >= 5x lower than full prefill", r["ttft_ms"] * 5 <= full["ttft_ms"],
                       f"{r['ttft_ms']:.0f} vs {full['ttft_ms']:.0f} ms ({full['ttft_ms'] / r['ttft_ms']:.1f}x)"))
        if peers:
            fast = min(peers, key=lambda p: p["ttft_ms"])
            checks.append((f"{r['label']}: TTFT >= 3x lower than the fastest peer's ({fast['label']})",
                           r["ttft_ms"] * 3 <= fast["ttft_ms"],
                           f"{r['ttft_ms']:.0f} vs {fast['ttft_ms']:.0f} ms ({fast['ttft_ms'] / r['ttft_ms']:.1f}x)"))
            fast = min(peers, key=lambda p: p["total_ms_p50"])
            checks.append((f"{r['label']}: prompt to last token >= 2x faster than the fastest peer ({fast['label']})",
                           r["total_ms_p50"] * 2 <= fast["total_ms_p50"],
                           f"p50 {r['total_ms_p50']:.0f} vs {fast['total_ms_p50']:.0f} ms "
                           f"({fast['total_ms_p50'] / r['total_ms_p50']:.2f}x)"))
    return checks


def markdown(results: dict) -> str:
    def num(v, fmt):
        return format(v, fmt) if v is not None else "-"

    def x(rs, key):
        v = (rs or {}).get(key)
        return f"{v:.2f}x" if v is not None else "-"

    b = results["batch"]
    lines = [
        f"Generation: {results['model']}, {results['prompt_tokens']}-token chat prompt "
        f"({results.get('prompt', 'synthetic')}), {results['new_tokens']} "
        f"greedy tokens (no EOS stop), {results['threads']} threads, median of {results['runs']} runs after a "
        f"warm-up; one engine at a time, each in its own process"
        + (f"; medians over {results['rounds']} rounds of every engine in turn" if results.get("rounds", 1) > 1 else "")
        + f". Machine: {results['machine']}.",
        "",
        "Ratios: speed relative to the reference, higher is better (TTFT: reference time / this time).",
        "",
        f"| engine | TTFT ms | decode tok/s b1 | prompt to last token p50 / p95 ms | decode tok/s b{b} | peak RSS MB "
        f"| greedy = PyTorch | TTFT vs PyTorch | b1 vs PyTorch | b{b} vs PyTorch | TTFT vs genai int4 "
        f"| b1 vs genai int4 | b{b} vs genai int4 |",
        "|---|" + "---:|" * 12,
    ]
    for r in results["engines"].values():
        if r["status"] != "ok":
            lines.append(f"| {r['label']} | {r['status']} |" + " |" * 11)
            continue
        gm = r.get("greedy_match")
        match = f"{gm}/{results['new_tokens']}" if gm is not None else "-"
        b8 = num(r["decode_tok_s_b8"], ".1f") if r["decode_tok_s_b8"] is not None else f"- ({r.get('b8_note')})"
        totals = (f"{r['total_ms_p50']:.0f} / {r['total_ms_p95']:.0f}" if r.get("total_ms_p50") is not None
                  else "-")
        lines.append(f"| {r['label']} | {r['ttft_ms']:.0f} | {r['decode_tok_s_b1']:.1f} | {totals} | {b8} "
                     f"| {r['peak_rss_mb']:.0f} | {match} "
                     f"| {x(r['vs_pytorch'], 'ttft')} | {x(r['vs_pytorch'], 'decode_b1')} "
                     f"| {x(r['vs_pytorch'], 'decode_b8')} | {x(r['vs_genai_int4'], 'ttft')} "
                     f"| {x(r['vs_genai_int4'], 'decode_b1')} | {x(r['vs_genai_int4'], 'decode_b8')} |")
    checks = results.get("acceptance", [])
    if checks:
        lines += ["", "Targets (issue 4; issue 18 for passage KV):", ""]
        for c in checks:
            mark = {True: "met", False: "NOT met", None: "not measured"}[c["passed"]]
            lines.append(f"- {c['check']}: {mark} ({c['figures']})")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ok = [r for r in results["engines"].values() if r["status"] == "ok"]
    b = results["batch"]
    panels = [("ttft_ms", "time to first token (ms, lower is better)"),
              ("decode_tok_s_b1", "decode tokens/s, batch 1"),
              ("decode_tok_s_b8", f"decode tokens/s, batch {b} (all streams)") if b > 1 else
              ("total_ms_p50", f"prompt to last of {results['new_tokens']} tokens, p50 (ms, lower is better)"),
              ("peak_rss_mb", "peak RSS (MB)")]
    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    for ax, (key, title) in zip(axes.flat, panels):
        names = [r["label"] for r in ok]
        values = [r.get(key) or 0.0 for r in ok]
        colors = ["tab:red" if r["id"].startswith("ragrt") else "tab:gray" for r in ok]
        bars = ax.barh(names, values, color=colors)
        ax.bar_label(bars, fmt="%.0f" if key != "decode_tok_s_b1" else "%.1f", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=8)
    fig.suptitle(f"{results['model']}: {results['prompt_tokens']}-token prompt, {results['new_tokens']} greedy "
                 f"tokens, {results['threads']} threads ({results['machine']})", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    from ragrt.bundle.atomic import atomic_write_bytes
    atomic_write_bytes(path, buf.getvalue())


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs"


# ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", action="append", default=[],
                    help="a ragrt bundle to measure (repeat for int8 and int4); the first also gives the prompt")
    ap.add_argument("--checkpoint", default=None,
                    help="HF checkpoint dir the peers run (default: the packaged SmolLM2, as ragrt export uses)")
    ap.add_argument("--engines", default="all",
                    help=f"comma-separated subset of: ragrt, {', '.join(PEERS)} (default: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=320)
    ap.add_argument("--rag-prompt", action="store_true",
                    help="instead of --prompt-tokens of the first passages: --question's top --k passages "
                         "retrieved from the first bundle (about 700 tokens at k=5), the prompt users really send")
    ap.add_argument("--question", default=QUESTION, help="the question of --rag-prompt")
    ap.add_argument("--k", type=int, default=5, help="passages in --rag-prompt")
    ap.add_argument("--passage-kv", action="store_true",
                    help="with --rag-prompt: also each bundle with passage KV, its blocks all cached (hit) "
                         "and none cached (miss)")
    ap.add_argument("--drafts", action="store_true",
                    help="also each bundle decoding with prompt-lookup drafts, as `ask` does where the bundle "
                         "turns them on (batch 1; with --passage-kv, a hit too)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8, help="rows of the batched measurement (the prompt repeated)")
    ap.add_argument("--runs", type=int, default=5, help="timed runs per measurement, after one warm-up")
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure every engine in turn this many times and report medians over rounds: this "
                         "machine's speed drifts over minutes, and rounds spread each engine across them")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds allowed per engine and phase")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--markdown", default=None, help="write the table here")
    ap.add_argument("--plot", default=None, help="write bar charts here (PNG, needs matplotlib)")
    for hidden in ("--_worker", "--_spec", "--_out"):
        ap.add_argument(hidden, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not args._worker and not args.bundle:
        ap.error("--bundle is required (it gives the prompt, and the ragrt engines)")
    if args.passage_kv and not args.rag_prompt:
        ap.error("--passage-kv needs --rag-prompt: passage KV reuses the blocks of retrieved passages")
    return args


def select(args) -> list[tuple[str, dict]]:
    """(engine id, worker spec) in run order: PyTorch first (the greedy reference), ragrt, peers."""
    from ragrt.bundle.manifest import read_manifest
    wanted = [w.strip() for w in args.engines.split(",") if w.strip()] if args.engines != "all" else None
    unknown = [w for w in wanted or [] if w != "ragrt" and not w.startswith("ragrt-") and w not in PEERS]
    if unknown:
        raise SystemExit(f"unknown engines: {', '.join(unknown)} (known: ragrt, {', '.join(PEERS)})")
    chosen = []
    if wanted is None or BASELINE in wanted:
        chosen.append((BASELINE, {}))
    seen = set()
    for path in args.bundle:
        q = read_manifest(Path(path)).generator.quantization
        eid = f"ragrt-{q}"
        while eid in seen:
            eid += "'"
        seen.add(eid)
        if wanted is None or "ragrt" in wanted or eid in wanted:
            bundle, name = str(Path(path).resolve()), f"ragrt {q} ({Path(path).name})"
            chosen.append((eid, {"bundle": bundle, "label": name}))
            if args.passage_kv:
                chosen += [(f"{eid}-kv-{case}", {"bundle": bundle, "label": f"{name}, passage KV {case}",
                                                 "passage_kv": case}) for case in ("hit", "miss")]
            if args.drafts:
                chosen.append((f"{eid}-drafts", {"bundle": bundle, "label": f"{name}, drafts", "drafts": True}))
                if args.passage_kv:
                    chosen.append((f"{eid}-kv-hit-drafts", {"bundle": bundle, "label": f"{name}, passage KV hit, drafts",
                                                            "passage_kv": "hit", "drafts": True}))
    chosen += [(p, {}) for p in PEERS if p != BASELINE and (wanted is None or p in wanted)]
    return chosen


def main(argv=None) -> None:
    args = parse_args(argv)
    if args._worker:
        return worker(args)

    from ragrt.bundle.atomic import atomic_write_text
    from ragrt.export.models import checkpoint_name, generator_checkpoint
    layout = None
    if args.rag_prompt:
        # In a worker: an engine opened here would raise every later worker's peak RSS, which
        # Linux carries across fork.
        built = call_worker("rag_prompt", {"bundle": args.bundle[0], "question": args.question, "k": args.k,
                                           "threads": args.threads}, args.timeout)
        if "status" in built:
            raise SystemExit(f"building the RAG prompt failed: {built['status']}")
        prompt, eos, layout = built["prompt"], built["eos"], built["layout"]
    else:
        prompt, eos = build_prompt(args.bundle[0], args.prompt_tokens, args.threads)
        if len(prompt) != args.prompt_tokens:
            print(f"note: the prompt is {len(prompt)} tokens, not {args.prompt_tokens}", file=sys.stderr)
    chosen = select(args)
    checkpoint = None
    if any(not eid.startswith("ragrt") for eid, _ in chosen):
        checkpoint = generator_checkpoint(args.checkpoint)

    results = {"machine": machine(), "threads": args.threads, "prompt_tokens": len(prompt),
               "prompt": f"RAG: top {args.k} passages for {args.question!r}" if args.rag_prompt else "synthetic",
               "new_tokens": args.new_tokens, "batch": args.batch, "runs": args.runs, "rounds": args.rounds,
               "model": checkpoint_name(checkpoint) if checkpoint else "the bundle's generator",
               "checkpoint": str(checkpoint) if checkpoint else None,
               "prompt_ids": prompt, "engines": {}}
    print(f"prompt {len(prompt)} tokens, {args.new_tokens} greedy tokens, batch 1 and {args.batch}, "
          f"{args.threads} threads, median of {args.runs}"
          + (f", {args.rounds} rounds of every engine in turn" if args.rounds > 1 else ""), flush=True)
    specs, entries = {}, {}
    for eid, extra in chosen:
        specs[eid] = {"engine": eid, "prompt": prompt, "eos": eos, "new_tokens": args.new_tokens,
                      "threads": args.threads, "runs": args.runs, "batch": args.batch, "blocks": layout,
                      "checkpoint": str(checkpoint) if checkpoint else None, **extra}
        entries[eid] = {"id": eid, "label": extra.get("label") or PEERS[eid][0]}
        if not eid.startswith("ragrt"):
            prepared = call_worker("prepare", specs[eid], args.timeout)
            if "status" in prepared:
                if "not installed" in prepared["status"]:
                    prepared["status"] += f"; pip install {PEERS[eid][1]}"
                entries[eid].update(prepared)
            specs[eid]["artefact"] = prepared.get("artefact")
    reference = None
    order = list(entries)
    for r in range(args.rounds):
        if args.rounds > 1:
            print(f"round {r + 1} of {args.rounds}", flush=True)
        for eid in order[r % len(order):] + order[:r % len(order)]:
            entry = entries[eid]
            if entry.get("status", "ok") != "ok":
                if r == 0:
                    print(f"  {entry['label']:52s} {entry['status']}", flush=True)
                continue
            t = time.perf_counter()
            measured = call_worker("measure", specs[eid], args.timeout)
            if "status" in measured:
                entry.update(measured)
                print(f"  {entry['label']:52s} {entry['status']}", flush=True)
                continue
            entry.setdefault("rounds", []).append(measured)
            if eid == BASELINE and reference is None:
                reference = measured["tokens"]
            b8 = measured["decode_tok_s_b8"]
            print(f"  {entry['label']:52s} TTFT {measured['ttft_ms']:7.0f} ms  b1 {measured['decode_tok_s_b1']:6.1f} tok/s  "
                  f"b{args.batch} {f'{b8:6.1f}' if b8 is not None else '     -'} tok/s  "
                  f"RSS {measured['peak_rss_mb']:5.0f} MB  ({time.perf_counter() - t:.0f} s)", flush=True)
    for eid, entry in entries.items():
        if entry.get("status", "ok") == "ok":
            entry.update(combine_rounds(entry["rounds"]), status="ok")
            entry["greedy_match"] = _common_prefix(entry["tokens"], reference) if reference else None
        results["engines"][eid] = entry

    ratios(results)
    results["acceptance"] = [{"check": c, "passed": p, "figures": f} for c, p, f in acceptance(results)]
    table = markdown(results)
    print("\n" + table)
    if args.json:
        atomic_write_text(args.json, json.dumps(results, indent=2) + "\n")
    if args.markdown:
        atomic_write_text(args.markdown, table)
    if args.plot:
        try:
            plot(results, args.plot)
        except ImportError as e:
            print(f"no plot: {e} (pip install matplotlib)", file=sys.stderr)


def combine_rounds(rounds: list[dict]) -> dict:
    """An engine's figures over rounds: medians of the timings, the largest peak RSS, the
    first round's tokens (greedy decoding repeats them)."""
    import statistics
    out = dict(rounds[0])
    for key in ("ttft_ms", "decode_tok_s_b1", "decode_tok_s_b8", "ttft_ms_b8", "load_rss_mb", "total_ms_p50",
                "total_ms_p95"):
        values = [r[key] for r in rounds if r.get(key) is not None]
        out[key] = statistics.median(values) if values else None
    out["peak_rss_mb"] = max(r["peak_rss_mb"] for r in rounds)
    return out


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


if __name__ == "__main__":
    main()
