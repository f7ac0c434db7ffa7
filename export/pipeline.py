"""`ragrt export`: corpus + checkpoints -> one bundle directory.

load -> export ONNX -> quantize -> parity (cached per checkpoint and graph variant, each built
only when a bundle ships it) -> chunk -> embed + index
-> manifest -> atomic rename. The model steps are cached by checkpoint hash, so a new
corpus costs only its chunking and embedding.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ragrt import __version__
from ragrt.bundle.reader import Bundle
from ragrt.corpus.documents import chunk_documents, read_documents
from ragrt.retrieval.encoder import TextEncoder
from ragrt.errors import RagrtError, UserInputError
from ragrt.options import MODES, PASSAGE_KV_REPAIR
from ragrt.bundle.versions import CORPUS_DIR, DATA_FILE, INDEX_FILE, OFFSETS_FILE, publish, staging
from ragrt.bundle.integrity import sha256_file
from ragrt.bundle.manifest import (MANIFEST_NAME, PACKED_IO, SCHEMA, ChunkingSpec, CorpusProvenance,
                             EncoderParity, EncoderSpec, GeneratorIO, GeneratorSpec, GreedyAgreement, Manifest,
                             DecodingScore, KVCacheParity, ModelSource, ParityReport, PassageKVParity, PassagesSpec,
                             RagDefaults, written_version)
from ragrt.decoding.prompt import PromptBuilder
from ragrt.decoding.blocks import unavailable_in
from ragrt.runtime.sessions import SessionConfig

from ragrt.export.cache import cached_dir, content_key
from ragrt.export.index import build_index, cached_embeddings
from ragrt.retrieval.bm25 import write_bm25
from ragrt.export.models import (POOLINGS, checkpoint_name, encoder_checkpoint, encoder_conventions,
                                 generator_checkpoint)
from ragrt.export.pack import DECODING, DECODING_CANDIDATES, LOOP_LIMIT, library_versions, model_file_entries, now, prompt_spec, staging_dir, templates, write_manifest

log = logging.getLogger("ragrt.export")

# Part of the cache keys: bump one when a change alters what its cached entries hold.
ENCODER_EXPORT_VERSION = "8"
ENCODER_VARIANTS = ("int8", "w8a8", "fp32")
GENERATOR_EXPORT_VERSION = "7"
# The int4 graph whose keys and values are the checkpoint's (AWQ leaves v_proj alone), so that it can
# decode on a cache the int8 graph prefilled: the step graph of `--step-weights int4`.
STEP_INT4 = "int4-steps"
STEP_WEIGHTS = ("shared", "int4")
# The int4 step graph runs passes of at most this many rows: at the RAG prompt it decoded 1.4x the
# int8 step graph at one row and 0.9x at eight (benchmarks/README, "Session 20").
INT4_STEP_ROWS = 4
GENERATOR_VARIANTS = {"fused": ("fp32", "int8", "w8a8", "int4", "fp16"), "optimum": ("fp32", "int8", "int4")}
# optimum's export (any attention mask; quantized by us) or onnxruntime-genai's builder graph
# (fused attention, rotary and norms), measured faster; see export/genai_build.py.
GRAPHS = ("optimum", "fused")
FUSED_EXPORT_VERSION = "14"
ENCODER_MAX_LENGTH = 256
PARITY_NEW_TOKENS = 24
# Below this teacher-forced top-1 agreement with PyTorch, quantized output is judged broken
# (garbage text, as plain dynamic QInt8 gives on AVX2 CPUs, scores far lower).
MIN_QUANT_AGREEMENT = 0.8
# The teacher-forced agreement that turns passage KV on without --dev answers, calibrated against F1
# on 178 FAQ questions the base generator never trained on (benchmarks/README, "Session 18"): it lost
# 1.6 points at 0.942 (the shipped repair, 16) and 1.7 at 0.963, and held (-0.8) only at 0.969, so the
# base generator at the shipped repair keeps full prefill unless --dev answers show block mode holds.
PASSAGE_KV_AGREEMENT = 0.966


@dataclass(frozen=True)
class ExportConfig:
    corpus: Path
    out: Path
    quantize: str = "int8"
    encoder_quantize: str = "fp32"        # the corpus's own graph, and the fastest on questions
    index_dtype: str = "f16"
    encoder: Path | str | None = None       # an HF directory or a packaged name (models.py); None: the default
    generator: Path | str | None = None     # an HF directory, a GGUF file or a packaged name
    # The encoder's pooling and prefixes; None: as its sentence-transformers files say (models.encoder_conventions).
    encoder_pooling: str | None = None
    query_prefix: str | None = None
    passage_prefix: str | None = None
    chunk_tokens: int = 128
    overlap: int = 32
    max_context: int = 2048
    force: bool = False
    parity_prompts: int = 20
    graph: str = "fused"
    dev: Path | None = None                 # QA JSONL: F1 with and without passage KV decides its default
    passage_kv: str = "lazy"                # lazy: blocks computed at question time; all: precomputed into the corpus
    kv_cache: str = "auto"                  # decode steps' KV cache: auto, int8 (quant/kvcache.py) or float32
    step_weights: str = "shared"            # shared: one step graph; int4: an int4 one for small passes too
    shards: int = 1                         # index shards of consecutive passages (retrieval/shards.py)
    ray: str | None = None                  # chunk and embed on Ray: "local" or a cluster address (ray_embed.py)
    answer_mode: str = "auto"               # rag.mode; auto: the better on --dev answers, concat without --dev


def _say(msg: str) -> None:
    print(f"[ragrt export] {msg}", flush=True)


@contextmanager
def steps(what: str, names: list[str]) -> Iterator[Callable[[], None]]:
    """A progress bar on stderr over the steps of a long build: the step running, the time
    spent and an estimate of the time left. Call the yielded function as each step ends."""
    from tqdm import tqdm
    with tqdm(total=len(names), desc=what, unit="step", postfix=names[0],
              bar_format="{desc}: {n}/{total} steps [{elapsed}<{remaining}{postfix}]") as bar:
        def step() -> None:
            bar.update(1)
            if bar.n < len(names):
                bar.set_postfix_str(names[bar.n])
        yield step
        bar.update(len(names) - bar.n)          # the last step ends with the block


@contextmanager
def quiet_exporters():
    """The exporters warn about tracing details we have checked (parity proves the graphs);
    a user should see our progress lines, not pages of TracerWarnings. --log-level debug shows all."""
    if log.isEnabledFor(logging.DEBUG):
        yield
        return
    from transformers.utils import logging as hf_logging
    root = logging.getLogger()
    saved = hf_logging.get_verbosity(), root.level
    hf_logging.set_verbosity_error()
    root.setLevel(logging.ERROR)          # onnxruntime.quantization logs its advice on the root logger
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(saved[0])
        root.setLevel(saved[1])


def encoder_graphs(checkpoint: Path, pooling: str = "mean") -> Path:
    """Cached: {fp32,int8}/model.onnx, tokenizer.json, meta.json (dims and parity). fp32 embeds
    the corpus and is the default query encoder; int8 (`--encoder-quantize int8`) is the smaller
    one, and its parity a manifest field; each takes seconds."""
    from ragrt.export.onnx.graphs import export_encoder
    from ragrt.export.parity import encoder_parity
    from ragrt.export.quant.quantize import quantize_encoder

    def build(tmp: Path) -> None:
        with steps(f"encoder {checkpoint_name(checkpoint)}", ["ONNX export", "int8", "parity"]) as step:
            exp = export_encoder(checkpoint, tmp / "fp32", max_length=ENCODER_MAX_LENGTH, pooling=pooling)
            step()
            quantize_encoder(tmp / "fp32" / "model.onnx", tmp / "int8" / "model.onnx")
            shutil.copyfile(tmp / "fp32" / "tokenizer.json", tmp / "tokenizer.json")
            step()
            fp32, int8 = (TextEncoder(tmp / q / "model.onnx", tmp / "tokenizer.json", max_length=exp.max_length,
                                      dim=exp.dim) for q in ("fp32", "int8"))
            parity = encoder_parity(checkpoint, fp32, int8, max_length=exp.max_length, pooling=pooling)
        _say(f"encoder parity vs PyTorch: cosine fp32 {parity.fp32_cosine_mean:.4f}, int8 mean "
             f"{parity.int8_cosine_mean:.4f} / min {parity.int8_cosine_min:.4f}")
        meta = {"dim": exp.dim, "max_length": exp.max_length, "parity": asdict(parity)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))

    recipe = _encoder_recipe(pooling)
    return cached_dir("encoder-onnx", content_key(checkpoint, recipe), build, lineage=content_key(checkpoint),
                      recipe=recipe)


def _encoder_recipe(pooling: str) -> str:
    """Mean pooling keeps the key it had before pooling was a choice, and so its cache entries."""
    return f"export-v{ENCODER_EXPORT_VERSION}" + ("" if pooling == "mean" else f" pooling-{pooling}")


def encoder_w8a8_graph(checkpoint: Path, pooling: str = "mean") -> Path:
    """Cached: model.onnx, meta.json (the parity of all three graphs), made from
    `encoder_graphs(checkpoint)`'s fp32 graph; only `--encoder-quantize w8a8` needs it."""
    from ragrt.export.parity import encoder_parity
    from ragrt.export.quant.quantize import quantize_encoder_w8a8
    base = encoder_graphs(checkpoint, pooling)

    def build(tmp: Path) -> None:
        meta = json.loads((base / "meta.json").read_text())
        with steps(f"encoder {checkpoint_name(checkpoint)}", ["w8a8", "parity"]) as step:
            quantize_encoder_w8a8(base / "fp32" / "model.onnx", tmp / "model.onnx")
            step()
            fp32, int8, w8a8 = (TextEncoder(path, base / "tokenizer.json", max_length=meta["max_length"], dim=meta["dim"])
                                for path in (base / "fp32" / "model.onnx", base / "int8" / "model.onnx",
                                             tmp / "model.onnx"))
            parity = encoder_parity(checkpoint, fp32, int8, w8a8, max_length=meta["max_length"], pooling=pooling)
        _say(f"encoder parity vs PyTorch: cosine w8a8 mean {parity.w8a8_cosine_mean:.4f} / min "
             f"{parity.w8a8_cosine_min:.4f}")
        (tmp / "meta.json").write_text(json.dumps({**meta, "parity": asdict(parity)}, indent=2, sort_keys=True))

    recipe = _encoder_recipe(pooling)
    return cached_dir("encoder-w8a8", content_key(checkpoint, recipe), build, lineage=content_key(checkpoint),
                      recipe=recipe)


def generator_spec(meta: dict, model: str, quantization: str, max_context: int, source: ModelSource,
                   graph: str = "optimum") -> GeneratorSpec:
    fused = graph == "fused"
    return GeneratorSpec(
        model=model, tokenizer="generator/tokenizer.json", quantization=quantization,
        num_layers=meta["num_layers"], num_kv_heads=meta["num_kv_heads"], head_dim=meta["head_dim"],
        vocab_size=meta["vocab_size"], eos_token_ids=tuple(meta["eos_token_ids"]),
        pad_token_id=meta["pad_token_id"], max_context=min(max_context, meta["max_position_embeddings"]),
        source=source, kv_dtype="float16" if quantization == "fp16" else "float32",
        # Measured by the parity check (absent while it runs): int8 compute can give a row
        # different numbers in different pass shapes.
        **{flag: bool(meta.get("parity", {}).get(quantization, {}).get(flag, False))
           for flag in ("batch_invariant", "prefix_exact", "drafts_exact")},
        cache="packed" if fused else "masked",
        io=PACKED_IO if fused else GeneratorIO())


def generator_graph(checkpoint: Path, variant: str, parity_prompts: int, graph: str = "optimum") -> Path:
    """Cached: model.onnx, tokenizer.json, meta.json (dims, prompt, and the parity of this
    variant against PyTorch). One entry per variant, so an export builds only the graph it ships."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from ragrt.export.onnx.graphs import builder_options, describe_generator
    from ragrt.export.parity import onnx_agreement, parity_prompt_ids, torch_greedy

    def build(tmp: Path) -> None:
        names = [*_GRAPH_STEPS[graph, variant], "PyTorch reference", "parity"]
        with steps(f"generator {checkpoint_name(checkpoint)} {graph} {variant}", names) as step:
            exp = describe_generator(checkpoint, tmp)          # dims, stop tokens, template; tmp/tokenizer.json
            hf_tok = AutoTokenizer.from_pretrained(checkpoint)
            prompt = prompt_spec(exp.chat_template, lambda msgs: hf_tok.apply_chat_template(
                msgs, tokenize=False, add_generation_prompt=True))
            meta = {"num_layers": exp.num_layers, "num_kv_heads": exp.num_kv_heads, "head_dim": exp.head_dim,
                    "vocab_size": exp.vocab_size, "eos_token_ids": list(exp.eos_token_ids),
                    "pad_token_id": exp.pad_token_id, "max_position_embeddings": exp.max_position_embeddings,
                    "prompt": asdict(prompt), "graph": graph}
            src = ModelSource(checkpoint.name, "")
            spec = generator_spec(meta, "", variant, 2048, src, graph)
            tok = Tokenizer.from_file(str(tmp / "tokenizer.json"))
            builder = PromptBuilder(prompt, tok, budget=spec.max_context - PARITY_NEW_TOKENS)
            _build_generator_graph(checkpoint, graph, variant, tmp / "graph", builder, spec, step)
            for f in (tmp / "graph").glob("model.onnx*"):      # the graph, and its weights file if it has one
                os.replace(f, tmp / f.name)
            shutil.rmtree(tmp / "graph")
            prompts = parity_prompt_ids(builder, parity_prompts)
            ref = torch_greedy(checkpoint, prompts, spec, PARITY_NEW_TOKENS)
            step()
            a = onnx_agreement(tmp / "model.onnx", spec, prompts, ref, PARITY_NEW_TOKENS, tok.decode)
        _say(f"generator {variant} vs PyTorch, {a.prompts} prompts x {a.new_tokens} greedy tokens: exact "
             f"{a.exact_match:.2f}, prefix {a.prefix_agreement:.2f}, teacher-forced top-1 {a.teacher_forced_top1:.3f}")
        _say(f"{variant} sample answer: {a.sample!r}")
        meta["parity"] = {variant: asdict(a)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))

    if graph == "optimum":
        recipe = f"export-v{GENERATOR_EXPORT_VERSION}"
    else:   # the builder's options are part of the recipe, so changing one variant's rebuilds only that one
        # w8a8 rewrites the builder's fp32 graph; the step graph's int4 is the builder's int4
        built_as = {"w8a8": "fp32", STEP_INT4: "int4"}.get(variant, variant)
        recipe = " ".join([f"fused-v{FUSED_EXPORT_VERSION}", *builder_options(checkpoint, built_as)])
    # One lineage per variant: variants' recipes differ (their builder options), and an entry of
    # another recipe in its lineage is deleted as superseded (an int4 export deleted the int8 graph).
    return cached_dir("generator-onnx" if graph == "optimum" else "generator-fused",
                      content_key(checkpoint, recipe, f"parity-{parity_prompts}", variant), build,
                      lineage=content_key(checkpoint, f"parity-{parity_prompts}", variant), recipe=recipe)


# The steps of `_build_generator_graph` per (graph, variant), named for the progress bar.
_GRAPH_STEPS = {
    **{("fused", q): ["ONNX export", "merge MatMuls"] for q in ("fp32", "int8", "fp16")},
    ("fused", "w8a8"): ["fp32 ONNX export", "w8a8 rewrite", "merge MatMuls"],
    **{("fused", q): ["AWQ scaling", "int4 ONNX export", "GPTQ rounding", "merge MatMuls"] for q in ("int4", STEP_INT4)},
    ("optimum", "fp32"): ["ONNX export"],
    ("optimum", "int8"): ["fp32 ONNX export", "int8"],
    ("optimum", "int4"): ["fp32 ONNX export", "int4"],
}


def _build_generator_graph(checkpoint: Path, graph: str, variant: str, out: Path, builder: PromptBuilder,
                           spec: GeneratorSpec, step: Callable[[], None]) -> None:
    """Writes `out`/model.onnx; `step()` after each of `_GRAPH_STEPS[graph, variant]`.

    w8a8 is made from the fused fp32 graph (rowquant.py); int4 from a checkpoint whose input
    channels AWQ has rescaled (awq.py), with GPTQ's error compensation (gptq.py) in place of
    rounding to nearest; optimum's int8 and int4 quantize its fp32 export."""
    from ragrt.export.onnx.graphs import export_generator, export_generator_fused
    from ragrt.export.quant.awq import scale_checkpoint
    from ragrt.export.quant.gptq import round_graph
    from ragrt.export.quant.quantize import quantize_generator, quantize_generator_int4
    from ragrt.export.quant.rowquant import calibration_feeds, calibration_prompt_ids, quantize_rows
    from ragrt.export.quant.siblings import fuse_graph_file

    work = out.parent / "work"
    if graph == "optimum":
        if variant == "fp32":
            export_generator(checkpoint, out)
            step()
        else:
            export_generator(checkpoint, work)
            step()
            quantize = quantize_generator if variant == "int8" else quantize_generator_int4
            quantize(work / "model.onnx", out / "model.onnx")
            step()
        shutil.rmtree(work, ignore_errors=True)
        return
    if variant == "w8a8":
        export_generator_fused(checkpoint, work, "fp32")
        step()
        calibration = calibration_prompt_ids(builder)
        quantize_rows(work / "model.onnx", out / "model.onnx", calibration_feeds(calibration, spec))
        step()
    elif variant in ("int4", STEP_INT4):
        calibration = calibration_prompt_ids(builder)
        report = scale_checkpoint(checkpoint, work, calibration, keep_values=variant == STEP_INT4)
        step()
        export_generator_fused(work, out, "int4")
        step()
        rounded = round_graph(work, out / "model.onnx", calibration)
        step()
        _say(f"int4: AWQ scales from {report.tokens} calibration tokens cut the simulated int4 output "
             f"error to {report.error_ratio:.2f}x; GPTQ rounding of {rounded.matrices} weights then left "
             f"{rounded.error_ratio:.2f}x the error of rounding to nearest")
    else:
        export_generator_fused(checkpoint, out, variant)
        step()
    shutil.rmtree(work, ignore_errors=True)
    # Last, so AWQ, GPTQ and the w8a8 rewrite each see one MatMul per projection.
    merged = fuse_graph_file(out / "model.onnx")
    step()
    _say(f"merged {merged} sibling MatMuls (the MLP's gate and up projections)")


def _validate(cfg: ExportConfig) -> None:
    if cfg.graph not in GRAPHS:
        raise UserInputError(f"--graph must be one of {', '.join(GRAPHS)}, got {cfg.graph!r}")
    if cfg.encoder_quantize not in ENCODER_VARIANTS:
        raise UserInputError(f"--encoder-quantize must be one of {', '.join(ENCODER_VARIANTS)}, "
                             f"got {cfg.encoder_quantize!r}")
    if cfg.quantize not in GENERATOR_VARIANTS[cfg.graph]:
        raise UserInputError(f"--quantize must be one of {', '.join(GENERATOR_VARIANTS[cfg.graph])} "
                             f"for --graph {cfg.graph}, got {cfg.quantize!r}")
    if cfg.encoder_pooling not in (None, *POOLINGS):
        raise UserInputError(f"--encoder-pooling must be one of {', '.join(POOLINGS)}, got {cfg.encoder_pooling!r}")
    if cfg.max_context < 256:
        raise UserInputError(f"--max-context must be at least 256, got {cfg.max_context}")
    if not 1 <= cfg.parity_prompts:
        raise UserInputError("--parity-prompts must be at least 1")
    if cfg.passage_kv not in ("lazy", "all"):
        raise UserInputError(f"--passage-kv must be lazy or all, got {cfg.passage_kv!r}")
    if cfg.shards < 1:
        raise UserInputError(f"--shards must be at least 1, got {cfg.shards}")
    if cfg.passage_kv == "all" and cfg.graph != "fused":
        raise UserInputError("--passage-kv all needs the fused generator graph: drop --graph optimum")
    if cfg.kv_cache not in ("auto", "float32", "int8"):
        raise UserInputError(f"--kv-cache must be auto, float32 or int8, got {cfg.kv_cache!r}")
    if cfg.kv_cache == "int8" and (cfg.graph != "fused" or cfg.quantize == "fp16"):
        raise UserInputError("--kv-cache int8 needs the fused generator graph on the CPU: drop --graph optimum "
                             "and --quantize fp16")
    if cfg.step_weights not in STEP_WEIGHTS:
        raise UserInputError(f"--step-weights must be one of {', '.join(STEP_WEIGHTS)}, got {cfg.step_weights!r}")
    if cfg.step_weights == "int4" and (cfg.kv_cache == "float32" or cfg.graph != "fused"
                                       or cfg.quantize not in ("int8", "w8a8")):
        raise UserInputError("--step-weights int4 adds an int4 step graph over the int8 cache: it needs the "
                             "fused graph, --quantize int8 or w8a8, and not --kv-cache float32")
    if cfg.answer_mode not in ("auto", *MODES):
        raise UserInputError(f"--answer-mode must be auto or one of {', '.join(MODES)}, got {cfg.answer_mode!r}")
    if Path(cfg.out).exists() and not cfg.force:
        raise UserInputError(f"{cfg.out} already exists; pass --force to replace it")


def run_export(cfg: ExportConfig) -> Path:
    from tokenizers import Tokenizer

    from ragrt.export.parity import PARITY_PROMPTS
    _validate(cfg)
    cfg = ExportConfig(**{**asdict(cfg), "parity_prompts": min(cfg.parity_prompts, len(PARITY_PROMPTS))})
    # A bad corpus fails here, before minutes of model work.
    if cfg.ray is None:
        docs = list(read_documents(cfg.corpus))
        documents = len(docs)
    else:
        from ragrt.export.ray_embed import read_corpus
        docs, documents = read_corpus(cfg.corpus)   # a Parquet corpus stays a path, read on the cluster
    _say(f"{documents} documents read from {cfg.corpus}")
    with quiet_exporters():
        enc_ckpt, gen_ckpt = encoder_checkpoint(cfg.encoder), generator_checkpoint(cfg.generator)
        own = encoder_conventions(enc_ckpt, pooling=cfg.encoder_pooling)
        conventions = replace(own, **{k: v for k, v in (("query_prefix", cfg.query_prefix),
                                                        ("passage_prefix", cfg.passage_prefix)) if v is not None})
        pooling = conventions.pooling
        q = cfg.quantize
        enc_q = cfg.encoder_quantize
        enc_dir = encoder_graphs(enc_ckpt, pooling)
        enc_model = enc_dir / enc_q / "model.onnx"
        enc_meta = json.loads((enc_dir / "meta.json").read_text())
        if enc_q == "w8a8":
            w8a8_dir = encoder_w8a8_graph(enc_ckpt, pooling)
            enc_model = w8a8_dir / "model.onnx"
            enc_meta = json.loads((w8a8_dir / "meta.json").read_text())
        gen_dir = generator_graph(gen_ckpt, q, cfg.parity_prompts, cfg.graph)
        step_dir = generator_graph(gen_ckpt, STEP_INT4, cfg.parity_prompts, cfg.graph) if cfg.step_weights == "int4" else None
    gen_meta = json.loads((gen_dir / "meta.json").read_text())
    generator_parity = {variant: GreedyAgreement(**a) for variant, a in gen_meta["parity"].items()}
    agreement = generator_parity[q].teacher_forced_top1
    if q != "fp32" and agreement < MIN_QUANT_AGREEMENT:
        raise RagrtError(f"the {q} generator disagrees with PyTorch (teacher-forced top-1 agreement "
                         f"{agreement:.2f} < {MIN_QUANT_AGREEMENT}); export with --quantize fp32")

    with staging_dir(Path(cfg.out), force=cfg.force) as tmp:
        for sub in ("encoder", "generator", CORPUS_DIR):
            (tmp / sub).mkdir()
        shutil.copyfile(enc_model, tmp / "encoder" / "model.onnx")
        shutil.copyfile(enc_dir / "tokenizer.json", tmp / "encoder" / "tokenizer.json")
        shutil.copyfile(gen_dir / "model.onnx", tmp / "generator" / "model.onnx")
        shutil.copyfile(gen_dir / "tokenizer.json", tmp / "generator" / "tokenizer.json")

        chunk_tok = Tokenizer.from_file(str(tmp / "encoder" / "tokenizer.json"))
        # The corpus is embedded once, here, so it gets the fp32 graph whatever the bundle ships:
        # only queries go through the quantized one, whose rounding then touches one side of
        # each similarity instead of both (its effect on the FAQ splits: see quantize_encoder).
        if cfg.ray is None:
            passages = list(chunk_documents(docs, chunk_tok, max_tokens=cfg.chunk_tokens, overlap=cfg.overlap))
        else:
            from ragrt.export.ray_embed import RayEmbedding, embed_on_ray
            _say(f"chunking and embedding on Ray ({cfg.ray}) with the fp32 encoder")
            on_ray = embed_on_ray(docs, RayEmbedding(address=cfg.ray), model=enc_dir / "fp32" / "model.onnx",
                                  tokenizer=tmp / "encoder" / "tokenizer.json", max_length=enc_meta["max_length"],
                                  dim=enc_meta["dim"], max_tokens=cfg.chunk_tokens, overlap=cfg.overlap,
                                  passage_prefix=conventions.passage_prefix)
            passages = on_ray.passages
            _say(f"embedded by {on_ray.actors} actors x {on_ray.threads} threads on {len(on_ray.nodes)} node(s)")
        if not passages:
            raise UserInputError(f"{cfg.corpus}: the corpus has no text to index")
        _say(f"{len(passages)} passages of up to {cfg.chunk_tokens} tokens")

        from ragrt.export.onnx.graphs import graph_rotary
        from ragrt.export.parity import draft_parity, passage_kv_parity, shipped_generator
        from ragrt.export.train.finetune import training_record
        enc_source = ModelSource(checkpoint_name(enc_ckpt), content_key(enc_ckpt))
        gen_source = ModelSource(checkpoint_name(gen_ckpt), content_key(gen_ckpt))
        rotary, no_rotary = (graph_rotary(gen_ckpt, gen_dir / "model.onnx") if cfg.graph == "fused"
                             else ({}, "optimum's graph has no packed cache"))
        if no_rotary and cfg.passage_kv == "all":
            raise UserInputError(f"--passage-kv all cannot serve this generator exactly: {no_rotary}")
        if no_rotary:
            _say(f"no passage KV for this generator: {no_rotary}")
        generator = replace(generator_spec(gen_meta, "generator/model.onnx", q, cfg.max_context, gen_source, cfg.graph),
                            **rotary)
        prompt = templates(gen_meta["prompt"]["chat"])
        if unavailable_in(generator, prompt) is None:
            from ragrt.export.onnx.assemble_graph import write_assemble_graph
            if write_assemble_graph(tmp / generator.model, tmp / generator.weights, tmp / "generator" / "assemble.onnx"):
                generator = replace(generator, assemble_model="generator/assemble.onnx")
        record = training_record(gen_ckpt)
        trained = bool(record.get("block_attention"))
        # A block-trained generator learned to read blocks repaired as its training repaired them (none
        # before the repair existed); another repair there costs F1 (benchmarks/README).
        repair = record.get("passage_kv_repair", 0) if trained else PASSAGE_KV_REPAIR
        shipped = shipped_generator(tmp, generator, prompt, PARITY_NEW_TOKENS)
        kv_parity = None
        if int8_steps(cfg):
            generator, shipped, kv_parity = int8_kv_cache(tmp, generator, shipped, passages, cfg, step_dir)
        block_parity = passage_kv_parity(*shipped, trained=trained, prompts=cfg.parity_prompts,
                                         new_tokens=PARITY_NEW_TOKENS, repair=repair)
        if block_parity:
            _say(f"passage KV vs full prefill, {block_parity.prompts} prompts of 3 passages: teacher-forced top-1 "
                 f"agreement {block_parity.agreement:.3f} (generator {'trained' if trained else 'not trained'} "
                 f"with --block-attention; {repair} tokens of each later block recomputed)")
        drafts = draft_parity(*shipped, prompts=cfg.parity_prompts, new_tokens=PARITY_NEW_TOKENS)
        del shipped                             # the session's memory, before embedding
        _say(f"prompt-lookup drafts vs one token per pass, {drafts.prompts} prompts: {drafts.agreement:.3f} of the "
             f"greedy tokens kept ({'exact' if generator.drafts_exact else 'not exact'}; used "
             f"{'always' if generator.drafts_exact else 'only if --dev answers hold'})")
        mode = "concat" if cfg.answer_mode == "auto" else cfg.answer_mode
        passage_kv_default = bool(block_parity) and passage_kv_on_without_dev(block_parity, fine_tuned=bool(record))
        if block_parity and not cfg.dev:
            _say("passage KV off by default: a generator ragrt fine-tuned turns it on only by --dev answers" if record
                 else f"passage KV {'on' if passage_kv_default else 'off'} by default: agreement "
                      f"{block_parity.agreement:.3f} {'>=' if passage_kv_default else '<'} {PASSAGE_KV_AGREEMENT}, the "
                      f"level calibrated against F1 (with --dev, dev F1 decides)")
        manifest = Manifest(
            schema=SCHEMA, schema_version=written_version(shards=cfg.shards, mode=mode, model_conventions=bool(
                generator.rotary_inv_freq or generator.local_rotary_layers or conventions.query_prefix
                or conventions.passage_prefix)),
            ragrt_version=__version__, created_at=now(),
            files=model_file_entries(tmp),
            encoder=EncoderSpec(model="encoder/model.onnx", tokenizer="encoder/tokenizer.json", dim=enc_meta["dim"],
                                max_length=enc_meta["max_length"], output="embedding", quantization=enc_q, source=enc_source,
                                pooling=pooling, query_prefix=conventions.query_prefix,
                                passage_prefix=conventions.passage_prefix),
            generator=generator,
            prompt=prompt,
            chunking=ChunkingSpec(max_tokens=cfg.chunk_tokens, overlap=cfg.overlap),
            rag=RagDefaults(decoding=DECODING, retrieval="dense", retrieval_reason=NO_DEV_RETRIEVAL, mode=mode,
                            passage_kv="on" if passage_kv_default else "off",
                            passage_kv_repair=block_parity.repair if block_parity else 0),
            corpus=CorpusProvenance(source=str(cfg.corpus), documents=documents, passages=len(passages),
                                    embedded_with="fp32"),
            parity=ParityReport(encoder=EncoderParity(**enc_meta["parity"]), generator=generator_parity, used=q,
                                passage_kv=block_parity, drafts=drafts, kv_cache=kv_parity),
            versions=library_versions(),
        )
        write_manifest(tmp, manifest)

        if cfg.ray is None:
            encoder = TextEncoder(enc_dir / "fp32" / "model.onnx", tmp / "encoder" / "tokenizer.json",
                                  max_length=enc_meta["max_length"], dim=enc_meta["dim"], session_config=SessionConfig(),
                                  passage_prefix=conventions.passage_prefix)
            # The key holds the tokenizer too: the same weights with another vocabulary embed differently.
            vectors, seconds = cached_embeddings(passages, encoder, content_key(enc_dir / "fp32" / "model.onnx",
                                                                                tmp / "encoder" / "tokenizer.json"))
        else:
            vectors, seconds = on_ray.vectors, on_ray.seconds
        with staging(tmp) as gen:
            built = build_index(passages, vectors, index_path=gen / INDEX_FILE, data_path=gen / DATA_FILE,
                                offsets_path=gen / OFFSETS_FILE, dtype=cfg.index_dtype, shards=cfg.shards)
            _say(f"indexed {built.count} passages{f' in {cfg.shards} shards' if cfg.shards > 1 else ''}: embedding {seconds:.1f} s"
                 f"{'' if seconds else ' (cached: same encoder, same passages)'}, index {built.seconds_index:.1f} s")
            bm25 = write_bm25(gen, passages)
            if cfg.passage_kv == "all":
                from ragrt.decoding.blockstore import graph_id, write_store
                compute = None
                if cfg.ray is not None:
                    from ragrt.export.ray_passage_kv import RayBlocks, blocks_on_ray
                    _say(f"computing passage KV on Ray ({cfg.ray}) with the bundle's generator")
                    compute = blocks_on_ray(RayBlocks(address=cfg.ray), root=tmp, spec=manifest.generator,
                                            graph_id=graph_id(manifest))
                kv = write_store(tmp, manifest, gen, passages, compute=compute)
                _say(f"passage KV: {kv.blocks} blocks, {kv.tokens} tokens, {kv.bytes / 1e6:.1f} MB")
            publish(tmp, gen, number=1, manifest_sha256=sha256_file(tmp / MANIFEST_NAME), documents=documents,
                    index=built.shards[0], shards=built.shards[1:], bm25=bm25,
                    passages=PassagesSpec(data=DATA_FILE, offsets=OFFSETS_FILE, count=built.count))
        if cfg.dev:
            # Measured on the written bundle, so the manifest is written again with the figures.
            reseal(tmp, dev_decisions(tmp, cfg.dev, manifest, choose_mode=cfg.answer_mode == "auto"))
        Bundle.open(tmp, verify=True)           # the reader must accept what the writer wrote
    return Path(cfg.out)


KV_CALIBRATION_PROMPTS = 8     # of k=5 corpus passages each, beside the built-in calibration prompts
# `--kv-cache auto` keeps the int8 step graph only above this teacher-forced agreement with the
# float cache (the demo bundle measures 0.95-0.97); `--kv-cache int8` above MIN_QUANT_AGREEMENT.
KV_AUTO_AGREEMENT = 0.9


def int8_steps(cfg: ExportConfig) -> bool:
    """Whether the export tries an int8 step graph: asked for, or `auto` where onnxruntime's fused
    CPU graph can keep one (not fp16, whose cache already halves the bytes, nor the optimum graph)."""
    return cfg.kv_cache == "int8" or (cfg.kv_cache == "auto" and cfg.graph == "fused" and cfg.quantize != "fp16")


def int8_kv_cache(bundle: Path, generator: GeneratorSpec, shipped: tuple, passages: list,
                  cfg: ExportConfig, step_dir: Path | None) -> tuple[GeneratorSpec, tuple, KVCacheParity | None]:
    """Adds the int8 step graph (quant/kvcache.py) to the staged bundle, with scales fitted on the
    built-in calibration prompts and on prompts of the corpus's own passages; returns its spec and the
    generator opened with it (as `shipped_generator` gives it), and the step graph's agreement with the
    float cache on the parity prompts. Under `auto`, a step graph that disagrees is left out.
    `step_dir`, a cached STEP_INT4 graph: `int4_steps` adds it beside the step graph."""
    import random

    from ragrt.decoding.generator import load_decoder
    from ragrt.export.parity import parity_prompt_ids
    from ragrt.export.quant.kvcache import fit_kv_scales, kv_agreement, write_step_graph
    from ragrt.export.quant.rowquant import CALIBRATION_PROMPTS, calibration_prompt_ids

    decoder, builder = shipped
    sample = random.Random(0).sample(passages, min(len(passages), 5 * KV_CALIBRATION_PROMPTS))
    questions = [q for q, _ in CALIBRATION_PROMPTS]
    calibration = calibration_prompt_ids(builder) + [
        builder.build(questions[i % len(questions)], sample[5 * i:5 * i + 5]).ids
        for i in range(len(sample) // 5)]
    scales = fit_kv_scales(decoder, calibration)
    write_step_graph(bundle / generator.model, bundle / generator.weights, bundle / "generator" / "step.onnx", scales)
    np.save(bundle / "generator" / "kv_scales.npy", scales)
    spec = replace(generator, step_model="generator/step.onnx", kv_scales="generator/kv_scales.npy")
    with_steps = load_decoder(bundle, spec, SessionConfig()), builder
    prompts = parity_prompt_ids(builder, cfg.parity_prompts)
    parity = kv_agreement(decoder, with_steps[0], prompts, PARITY_NEW_TOKENS, sum(len(ids) for ids in calibration))
    _say(f"int8 KV cache for decode steps: scales from {parity.calibration_tokens} prompt tokens; teacher-forced "
         f"top-1 agreement with the float cache {parity.agreement:.3f} over {parity.prompts} prompts")
    floor = MIN_QUANT_AGREEMENT if cfg.kv_cache == "int8" else KV_AUTO_AGREEMENT
    if parity.agreement >= floor:
        if step_dir is None:
            return spec, with_steps, parity
        return int4_steps(bundle, spec, with_steps, parity, decoder, prompts, step_dir, scales)
    if cfg.kv_cache == "int8":
        raise RagrtError(f"the int8 KV cache disagrees with the float cache (teacher-forced top-1 agreement "
                         f"{parity.agreement:.2f} < {floor}); export with --kv-cache float32")
    _say(f"int8 KV cache left out (agreement below {floor}): decode steps keep the float cache")
    for name in ("step.onnx", "kv_scales.npy"):
        (bundle / "generator" / name).unlink()
    return generator, shipped, None


def int4_steps(bundle: Path, spec: GeneratorSpec, with_steps: tuple, parity: KVCacheParity, float_decoder,
               prompts: list[list[int]], step_dir: Path, scales: np.ndarray) -> tuple[GeneratorSpec, tuple, KVCacheParity]:
    """Adds the int4 step graph, made from the cached STEP_INT4 graph `step_dir` over its own weights
    file; returns the spec, the generator opened with it, and the parity with its agreement. Refused
    below MIN_QUANT_AGREEMENT's teacher-forced agreement with the float cache."""
    from ragrt.decoding.generator import load_decoder
    from ragrt.export.quant.kvcache import kv_agreement, write_step_graph

    int4 = replace(spec, int4_step_model="generator/step_int4.onnx", int4_step_rows=INT4_STEP_ROWS)
    path = bundle / int4.int4_step_model
    shutil.copyfile(step_dir / "model.onnx", path)
    write_step_graph(path, bundle / int4.int4_step_weights, path, scales)
    # Rows batched and drafts checked on it need its kernels' word on both.
    own = json.loads((step_dir / "meta.json").read_text())["parity"][STEP_INT4]
    int4 = replace(int4, batch_invariant=spec.batch_invariant and own["batch_invariant"],
                   drafts_exact=spec.drafts_exact and own["drafts_exact"])
    with_int4 = load_decoder(bundle, int4, SessionConfig())
    # kv_agreement's teacher-forced passes have one row each, so they all run on the int4 graph.
    agreement = kv_agreement(float_decoder, with_int4, prompts, PARITY_NEW_TOKENS, parity.calibration_tokens).agreement
    _say(f"int4 step graph for passes of up to {INT4_STEP_ROWS} rows: teacher-forced top-1 agreement with the float "
         f"cache {agreement:.3f}")
    if agreement < MIN_QUANT_AGREEMENT:
        raise RagrtError(f"the int4 step graph disagrees with the float cache (teacher-forced top-1 agreement "
                         f"{agreement:.2f} < {MIN_QUANT_AGREEMENT}); export with --step-weights shared")
    return int4, (with_int4, with_steps[1]), replace(parity, int4_agreement=agreement)


def passage_kv_holds_on_dev(parity: PassageKVParity) -> bool:
    """Block mode's dev answers within a point of full prefill's F1."""
    return parity.f1_blocks >= parity.f1_full - 0.01


def passage_kv_on_without_dev(parity: PassageKVParity, *, fine_tuned: bool) -> bool:
    """Without dev answers: where teacher-forced agreement reaches the level calibrated against F1
    on the packaged base generator (benchmarks/README). The calibration does not carry over to a
    generator `ragrt finetune` wrote, block-trained or not: four of them agreed 0.981 to 0.998 and
    lost 4.4 to 6.7 F1 points in block mode on the FAQ split, so one keeps full prefill."""
    return not fine_tuned and parity.agreement >= PASSAGE_KV_AGREEMENT


NO_DEV_RETRIEVAL = "no --dev set: dense"
# BM25 or hybrid becomes the default only this far above dense in dev recall@5 (issue 28): the
# FAQ's dev split has 36 questions, on which one question is 2.8 points.
RETRIEVAL_MARGIN = 0.03


def retrieval_default(recall_at_5: dict[str, float]) -> tuple[str, str]:
    """The default retrieval and the reason, from each retrieval's dev recall@5."""
    figures = "dev recall@5 " + ", ".join(f"{r} {v:.3f}" for r, v in recall_at_5.items())
    best = max((r for r in recall_at_5 if r != "dense"), key=recall_at_5.get, default=None)
    if best and recall_at_5[best] >= recall_at_5["dense"] + RETRIEVAL_MARGIN:
        return best, f"{figures}: {best}"
    return "dense", f"{figures}: dense, as nothing else is {RETRIEVAL_MARGIN * 100:.0f} points above it"


def dev_decisions(bundle: Path, dev: Path, manifest: Manifest, *, choose_mode: bool = True) -> Manifest:
    """Recall@5 on the dev questions with each retrieval, then answer F1 with the chosen retrieval and
    each candidate decoding default, then (with the chosen one) with passage KV, and with prompt-lookup
    drafts where they are not exact; the manifest with those figures and the defaults they decide."""
    from ragrt.engine import Engine
    from ragrt.decoding.sampling import DecodingConfig
    from ragrt.evaluate import evaluate, read_qa, retrieval_recall
    items = read_qa(dev)
    engine = Engine.open(bundle)
    parity, rag, generator = manifest.parity, manifest.rag, manifest.generator

    recall = {r: figures["recall@5"] for r, figures in retrieval_recall(engine, items).items()}
    retrieval, reason = retrieval_default(recall)
    rag = dataclasses.replace(rag, retrieval=retrieval, retrieval_reason=reason)
    engine.manifest = dataclasses.replace(engine.manifest, rag=rag)     # the answers below use it
    _say(f"retrieval: {reason}")

    scores = {}
    for label, candidate in DECODING_CANDIDATES.items():
        _say(f"answering the {len(items)} dev questions with decoding {label}")
        a = evaluate(engine, items, passage_kv="off", **dataclasses.asdict(candidate)).answer
        scores[label] = DecodingScore(f1=round(a["f1"], 4), loop_rate=round(a["loop_rate"], 4))
    fit = [label for label, sc in scores.items() if sc.loop_rate <= LOOP_LIMIT] or [next(iter(scores))]
    chosen = max(fit, key=lambda label: scores[label].f1)        # ties: the first listed
    rag = dataclasses.replace(rag, decoding=DECODING_CANDIDATES[chosen])
    parity = dataclasses.replace(parity, decoding=scores)
    engine.decoding = DecodingConfig.of(rag.decoding, rag.max_new_tokens)
    _say("dev F1 / loop rate: " + ", ".join(f"{k} {v.f1:.3f} / {v.loop_rate:.3f}" for k, v in scores.items())
         + f": default {chosen}")

    def f1(**options) -> float:
        return round(evaluate(engine, items, **options).answer["f1"], 4)

    full = scores[chosen].f1
    if parity.passage_kv:
        _say("... with passage KV")
        blocks = dataclasses.replace(parity.passage_kv, dev_questions=len(items), f1_full=full, f1_blocks=f1(passage_kv="on"))
        parity = dataclasses.replace(parity, passage_kv=blocks)
        rag = dataclasses.replace(rag, passage_kv="on" if passage_kv_holds_on_dev(blocks) else "off")
        _say(f"dev F1: full prefill {full:.3f}, passage KV {blocks.f1_blocks:.3f}: passage KV {rag.passage_kv} by default")
    if not generator.drafts_exact:
        _say("... with prompt-lookup drafts")
        engine.decoder.spec = dataclasses.replace(engine.decoder.spec, drafts=True)
        drafts = dataclasses.replace(parity.drafts, dev_questions=len(items), f1_without=full,
                                     f1_with=f1(passage_kv="off"))
        parity = dataclasses.replace(parity, drafts=drafts)
        # Within noise: the F1 of 36 questions moves by about a point on rounding-level changes.
        generator = dataclasses.replace(generator, drafts=drafts.f1_with >= full - 0.01)
        _say(f"dev F1: one token per pass {full:.3f}, drafts {drafts.f1_with:.3f}: drafts "
             f"{'on' if generator.drafts else 'off'}")
    generated = DecodingScore(f1=parity.passage_kv.f1_blocks if rag.passage_kv == "on" else full,
                              loop_rate=scores[chosen].loop_rate)
    rag, parity = answer_mode(engine, items, rag, parity, generated, choose=choose_mode)
    return dataclasses.replace(manifest, parity=parity, rag=rag, generator=generator,
                               schema_version=max(manifest.schema_version, written_version(shards=1, mode=rag.mode)))


EXTRACT_WORDS = (30, 45, 60, 80)      # candidate answer budgets of mode extract


def answer_mode(engine, items: list, rag: RagDefaults, parity: ParityReport, generated: DecodingScore, *,
                choose: bool = True) -> tuple[RagDefaults, ParityReport]:
    """Extract's answer budget fitted to the dev answers, then (`choose`) the default mode: extract where its
    dev F1 beats the generated answers' (a generator that distorts its passages), concat otherwise."""
    from ragrt.evaluate import evaluate
    fits = {}
    for words in EXTRACT_WORDS:
        settings = dataclasses.replace(rag.extract, words=words)
        engine.manifest = dataclasses.replace(engine.manifest, rag=dataclasses.replace(rag, extract=settings))
        fits[words] = evaluate(engine, items, mode="extract").answer
    words = max(EXTRACT_WORDS, key=lambda w: fits[w]["f1"])        # ties: the shortest
    extracted = DecodingScore(f1=round(fits[words]["f1"], 4), loop_rate=round(fits[words]["loop_rate"], 4))
    mode = ("extract" if extracted.f1 > generated.f1 else "concat") if choose else rag.mode
    _say(f"dev F1: generated {generated.f1:.3f}, extract {extracted.f1:.3f} (at most {words} words): "
         f"answer mode {mode} by default{'' if choose else ' (--answer-mode)'}")
    rag = dataclasses.replace(rag, mode=mode, extract=dataclasses.replace(rag.extract, words=words))
    return rag, dataclasses.replace(parity, answer_modes={"concat": generated, "extract": extracted})


def reseal(bundle: Path, manifest: Manifest) -> None:
    """Writes the final manifest of a bundle still being built, and seals its corpus generation to
    it again: a new generation of hard links to the same files, since a sealed one never changes."""
    old = Bundle.open(bundle).generation
    write_manifest(bundle, manifest)
    with staging(bundle) as gen:
        for rel in old.spec.files:
            (gen / rel).parent.mkdir(parents=True, exist_ok=True)
            os.link(old.path / rel, gen / rel)
        publish(bundle, gen, number=old.spec.number + 1, manifest_sha256=sha256_file(bundle / MANIFEST_NAME),
                index=old.spec.index, shards=old.spec.shards, passages=old.spec.passages, documents=old.spec.documents,
                bm25=old.spec.bm25, linked_from=old)
    shutil.rmtree(old.path)
