"""`ragrt export`: corpus + checkpoints -> one bundle directory.

load -> export ONNX -> quantize -> parity (cached per checkpoint) -> chunk -> embed + index
-> manifest -> atomic rename. The model steps are cached by checkpoint hash, so a new
corpus costs only its chunking and embedding.
"""
from __future__ import annotations

import json
import logging
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from ragrt import __version__
from ragrt.bundle.reader import Bundle
from ragrt.corpus.documents import chunk_documents, read_documents
from ragrt.retrieval.encoder import TextEncoder
from ragrt.errors import RagrtError, UserInputError
from ragrt.bundle.versions import CORPUS_DIR, DATA_FILE, INDEX_FILE, OFFSETS_FILE, publish, staging
from ragrt.bundle.integrity import sha256_file
from ragrt.bundle.manifest import (MANIFEST_NAME, PACKED_IO, SCHEMA, SCHEMA_VERSION, ChunkingSpec, EncoderSpec, GeneratorIO,
                             GeneratorSpec, IndexSpec, Manifest, PassagesSpec, PromptSpec, RagDefaults, Source)
from ragrt.decoding.prompt import PromptBuilder
from ragrt.runtime.sessions import SessionConfig
from ragrt.retrieval.passages import PassageRecord

from ragrt.export.cache import cached_dir, content_key
from ragrt.export.index import build_index, cached_embeddings
from ragrt.export.models import checkpoint_name, encoder_checkpoint, generator_checkpoint
from ragrt.export.pack import library_versions, model_file_entries, now, prompt_spec, staging_dir, with_tasks, write_manifest

log = logging.getLogger("ragrt.export")

# Part of the cache keys: bump one when a change alters what its cached entries hold.
ENCODER_EXPORT_VERSION = "7"
ENCODER_VARIANTS = ("int8", "w8a8", "fp32")
GENERATOR_EXPORT_VERSION = "6"
# w8a8 (int8 weights and per-token int8 activations, rowquant.py) is made from the fused fp32 graph,
# int4 from a checkpoint AWQ has rescaled (awq.py), rounded by GPTQ (gptq.py).
GENERATOR_VARIANTS = {"fused": ("fp32", "int8", "w8a8", "int4", "fp16"), "optimum": ("fp32", "int8", "int4")}
# optimum's export (any attention mask; quantized by us) or onnxruntime-genai's builder graph
# (fused attention, rotary and norms), measured faster; see export/genai_build.py.
GRAPHS = ("optimum", "fused")
FUSED_EXPORT_VERSION = "13"
ENCODER_MAX_LENGTH = 256
PARITY_NEW_TOKENS = 24
# Below this teacher-forced top-1 agreement with PyTorch, quantized output is judged broken
# (garbage text, as plain dynamic QInt8 gives on AVX2 CPUs, scores far lower).
MIN_QUANT_AGREEMENT = 0.8


@dataclass(frozen=True)
class ExportConfig:
    corpus: Path
    out: Path
    quantize: str = "int8"
    encoder_quantize: str | None = None    # None: fp32 when quantize is fp32, else int8
    index_dtype: str = "f16"
    encoder: Path | None = None
    generator: Path | None = None
    chunk_tokens: int = 128
    overlap: int = 32
    max_context: int = 2048
    force: bool = False
    parity_prompts: int = 20
    graph: str = "fused"


def _say(msg: str) -> None:
    print(f"[ragrt export] {msg}", flush=True)


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


def encoder_graphs(checkpoint: Path) -> Path:
    """Cached: {fp32,int8,w8a8}/model.onnx, tokenizer.json, meta.json (dims and parity)."""
    from ragrt.export.onnx.graphs import export_encoder
    from ragrt.export.parity import encoder_parity
    from ragrt.export.quant.quantize import quantize_encoder, quantize_encoder_w8a8

    def build(tmp: Path) -> None:
        _say(f"exporting encoder {checkpoint_name(checkpoint)} to ONNX, int8 and w8a8")
        exp = export_encoder(checkpoint, tmp / "fp32", max_length=ENCODER_MAX_LENGTH)
        quantize_encoder(tmp / "fp32" / "model.onnx", tmp / "int8" / "model.onnx")
        quantize_encoder_w8a8(tmp / "fp32" / "model.onnx", tmp / "w8a8" / "model.onnx")
        shutil.copyfile(tmp / "fp32" / "tokenizer.json", tmp / "tokenizer.json")
        encoders = [TextEncoder(tmp / q / "model.onnx", tmp / "tokenizer.json", max_length=exp.max_length, dim=exp.dim)
                    for q in ("fp32", "int8", "w8a8")]
        parity = encoder_parity(checkpoint, *encoders, max_length=exp.max_length)
        _say(f"encoder parity vs PyTorch: cosine fp32 {parity.fp32_cosine_mean:.4f}, int8 mean "
             f"{parity.int8_cosine_mean:.4f} / min {parity.int8_cosine_min:.4f}, w8a8 mean "
             f"{parity.w8a8_cosine_mean:.4f} / min {parity.w8a8_cosine_min:.4f}")
        meta = {"dim": exp.dim, "max_length": exp.max_length, "parity": asdict(parity)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))

    return cached_dir("encoder-onnx", content_key(checkpoint, f"export-v{ENCODER_EXPORT_VERSION}"), build,
                      lineage=content_key(checkpoint))


def generator_spec(meta: dict, model: str, quantization: str, max_context: int, source: Source,
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


def generator_graphs(checkpoint: Path, parity_prompts: int, graph: str = "optimum") -> Path:
    """Cached: {variant}/model.onnx, tokenizer.json, meta.json (dims, prompt, parity), where the
    variants are GENERATOR_VARIANTS[graph]."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from ragrt.export.onnx.graphs import FUSED_PRECISIONS, export_generator, export_generator_fused
    from ragrt.export.parity import onnx_agreement, parity_prompt_ids, torch_greedy
    from ragrt.export.quant.quantize import quantize_generator, quantize_generator_int4
    from ragrt.export.quant.awq import scale_checkpoint
    from ragrt.export.quant.gptq import round_graph
    from ragrt.export.quant.rowquant import calibration_feeds, calibration_prompt_ids, quantize_rows
    from ragrt.export.quant.siblings import fuse_graph_file

    def build(tmp: Path) -> None:
        _say(f"exporting generator {checkpoint_name(checkpoint)} to the {graph} ONNX graph "
             f"({', '.join(GENERATOR_VARIANTS[graph])}), then checking parity")
        if graph == "fused":
            exp, *_ = [export_generator_fused(checkpoint, tmp / q, q) for q in FUSED_PRECISIONS if q != "int4"]
        else:
            exp = export_generator(checkpoint, tmp / "fp32")
            quantize_generator(tmp / "fp32" / "model.onnx", tmp / "int8" / "model.onnx")
            quantize_generator_int4(tmp / "fp32" / "model.onnx", tmp / "int4" / "model.onnx")
        shutil.copyfile(tmp / "fp32" / "tokenizer.json", tmp / "tokenizer.json")
        hf_tok = AutoTokenizer.from_pretrained(checkpoint)
        prompt = prompt_spec(exp.chat_template, lambda msgs: hf_tok.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=True))
        meta = {"num_layers": exp.num_layers, "num_kv_heads": exp.num_kv_heads, "head_dim": exp.head_dim,
                "vocab_size": exp.vocab_size, "eos_token_ids": list(exp.eos_token_ids),
                "pad_token_id": exp.pad_token_id, "max_position_embeddings": exp.max_position_embeddings,
                "prompt": asdict(prompt), "graph": graph}
        src = Source(checkpoint.name, "")
        spec = generator_spec(meta, "", "fp32", 2048, src, graph)
        tok = Tokenizer.from_file(str(tmp / "tokenizer.json"))
        builder = PromptBuilder(prompt, tok, budget=spec.max_context - PARITY_NEW_TOKENS)
        prompts = parity_prompt_ids(builder, parity_prompts)
        if graph == "fused":
            calibration = calibration_prompt_ids(builder)
            quantize_rows(tmp / "fp32" / "model.onnx", tmp / "w8a8" / "model.onnx", calibration_feeds(calibration, spec))
            # int4 rounds a checkpoint whose input channels AWQ has rescaled (awq.py), with
            # GPTQ's error compensation (gptq.py) in place of rounding to nearest.
            report = scale_checkpoint(checkpoint, tmp / "awq", calibration)
            export_generator_fused(tmp / "awq", tmp / "int4", "int4")
            rounded = round_graph(tmp / "awq", tmp / "int4" / "model.onnx", calibration)
            shutil.rmtree(tmp / "awq")
            _say(f"int4: AWQ scales from {report.tokens} calibration tokens cut the simulated int4 output "
                 f"error to {report.error_ratio:.2f}x; GPTQ rounding of {rounded.matrices} weights then left "
                 f"{rounded.error_ratio:.2f}x the error of rounding to nearest")
            # Last, so AWQ, GPTQ and the w8a8 rewrite each see one MatMul per projection.
            merged = {q: fuse_graph_file(tmp / q / "model.onnx") for q in GENERATOR_VARIANTS[graph]}
            _say("merged sibling MatMuls (the MLP's gate and up projections): "
                 + ", ".join(f"{q} {n}" for q, n in merged.items()))
        ref = torch_greedy(checkpoint, prompts, spec, PARITY_NEW_TOKENS)
        parity = {q: onnx_agreement(tmp / q / "model.onnx", generator_spec(meta, "", q, 2048, src, graph), prompts, ref,
                                    PARITY_NEW_TOKENS, tok.decode)
                  for q in GENERATOR_VARIANTS[graph]}
        for q, a in parity.items():
            _say(f"generator {q} vs PyTorch, {a.prompts} prompts x {a.new_tokens} greedy tokens: exact {a.exact_match:.2f}, "
                 f"prefix {a.prefix_agreement:.2f}, teacher-forced top-1 {a.teacher_forced_top1:.3f}")
        _say(f"int8 sample answer: {parity['int8'].sample!r}")
        meta["parity"] = {q: asdict(a) for q, a in parity.items()}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))

    if graph == "optimum":
        key = content_key(checkpoint, f"export-v{GENERATOR_EXPORT_VERSION}", f"parity-{parity_prompts}")
    else:
        key = content_key(checkpoint, f"fused-v{FUSED_EXPORT_VERSION}", f"parity-{parity_prompts}")
    return cached_dir("generator-onnx" if graph == "optimum" else "generator-fused", key, build,
                      lineage=content_key(checkpoint, f"parity-{parity_prompts}"))


def _validate(cfg: ExportConfig) -> None:
    if cfg.graph not in GRAPHS:
        raise UserInputError(f"--graph must be one of {', '.join(GRAPHS)}, got {cfg.graph!r}")
    if cfg.encoder_quantize not in (None, *ENCODER_VARIANTS):
        raise UserInputError(f"--encoder-quantize must be one of {', '.join(ENCODER_VARIANTS)}, "
                             f"got {cfg.encoder_quantize!r}")
    if cfg.quantize not in GENERATOR_VARIANTS[cfg.graph]:
        raise UserInputError(f"--quantize must be one of {', '.join(GENERATOR_VARIANTS[cfg.graph])} "
                             f"for --graph {cfg.graph}, got {cfg.quantize!r}")
    if cfg.max_context < 256:
        raise UserInputError(f"--max-context must be at least 256, got {cfg.max_context}")
    if not 1 <= cfg.parity_prompts:
        raise UserInputError("--parity-prompts must be at least 1")
    if Path(cfg.out).exists() and not cfg.force:
        raise UserInputError(f"{cfg.out} already exists; pass --force to replace it")


def run_export(cfg: ExportConfig) -> Path:
    from tokenizers import Tokenizer

    from ragrt.export.parity import PARITY_PROMPTS
    _validate(cfg)
    cfg = ExportConfig(**{**asdict(cfg), "parity_prompts": min(cfg.parity_prompts, len(PARITY_PROMPTS))})
    docs = list(read_documents(cfg.corpus))     # a bad corpus fails here, before minutes of model work
    _say(f"{len(docs)} documents read from {cfg.corpus}")
    with quiet_exporters():
        enc_ckpt, gen_ckpt = encoder_checkpoint(cfg.encoder), generator_checkpoint(cfg.generator)
        enc_dir = encoder_graphs(enc_ckpt)
        gen_dir = generator_graphs(gen_ckpt, cfg.parity_prompts, cfg.graph)
    enc_meta = json.loads((enc_dir / "meta.json").read_text())
    gen_meta = json.loads((gen_dir / "meta.json").read_text())
    q = cfg.quantize
    agreement = gen_meta["parity"][q]["teacher_forced_top1"]
    if q != "fp32" and agreement < MIN_QUANT_AGREEMENT:
        raise RagrtError(f"the {q} generator disagrees with PyTorch (teacher-forced top-1 agreement "
                         f"{agreement:.2f} < {MIN_QUANT_AGREEMENT}); export with --quantize fp32")
    enc_q = cfg.encoder_quantize or ("fp32" if q == "fp32" else "int8")

    with staging_dir(Path(cfg.out), force=cfg.force) as tmp:
        for sub in ("encoder", "generator", CORPUS_DIR):
            (tmp / sub).mkdir()
        shutil.copyfile(enc_dir / enc_q / "model.onnx", tmp / "encoder" / "model.onnx")
        shutil.copyfile(enc_dir / "tokenizer.json", tmp / "encoder" / "tokenizer.json")
        shutil.copyfile(gen_dir / q / "model.onnx", tmp / "generator" / "model.onnx")
        shutil.copyfile(gen_dir / "tokenizer.json", tmp / "generator" / "tokenizer.json")

        chunk_tok = Tokenizer.from_file(str(tmp / "encoder" / "tokenizer.json"))
        passages = [PassageRecord(p.id, p.title, p.text)
                    for p in chunk_documents(docs, chunk_tok, max_tokens=cfg.chunk_tokens, overlap=cfg.overlap)]
        if not passages:
            raise UserInputError(f"{cfg.corpus}: the corpus has no text to index")
        # The corpus is embedded once, here, so it gets the fp32 graph whatever the bundle ships:
        # only queries go through the quantized one, whose rounding then touches one side of
        # each similarity instead of both (its effect on the FAQ splits: see quantize_encoder).
        _say(f"{len(passages)} passages of up to {cfg.chunk_tokens} tokens; embedding them with the fp32 encoder")
        encoder = TextEncoder(enc_dir / "fp32" / "model.onnx", tmp / "encoder" / "tokenizer.json",
                              max_length=enc_meta["max_length"], dim=enc_meta["dim"], session_config=SessionConfig())

        enc_source = Source(checkpoint_name(enc_ckpt), content_key(enc_ckpt))
        gen_source = Source(checkpoint_name(gen_ckpt), content_key(gen_ckpt))
        manifest = Manifest(
            schema=SCHEMA, schema_version=SCHEMA_VERSION, ragrt_version=__version__, created_at=now(),
            files=model_file_entries(tmp),
            encoder=EncoderSpec(model="encoder/model.onnx", tokenizer="encoder/tokenizer.json", dim=enc_meta["dim"],
                                max_length=enc_meta["max_length"], output="embedding", quantization=enc_q, source=enc_source),
            generator=generator_spec(gen_meta, "generator/model.onnx", q, cfg.max_context, gen_source,
                                     cfg.graph),
            prompt=with_tasks(PromptSpec(**gen_meta["prompt"])),
            chunking=ChunkingSpec(max_tokens=cfg.chunk_tokens, overlap=cfg.overlap),
            rag=RagDefaults(),
            corpus={"source": str(cfg.corpus), "documents": len(docs), "passages": len(passages),
                    "embedded_with": "fp32"},
            parity={"encoder": enc_meta["parity"], "generator": gen_meta["parity"], "used": q},
            versions=library_versions(),
        )
        write_manifest(tmp, manifest)

        # The key holds the tokenizer too: the same weights with another vocabulary embed differently.
        vectors, seconds = cached_embeddings(passages, encoder, content_key(enc_dir / "fp32" / "model.onnx",
                                                                            tmp / "encoder" / "tokenizer.json"))
        with staging(tmp) as gen:
            built = build_index(passages, vectors, index_path=gen / INDEX_FILE, data_path=gen / DATA_FILE,
                                offsets_path=gen / OFFSETS_FILE, dtype=cfg.index_dtype)
            _say(f"indexed {built.count} passages: embedding {seconds:.1f} s"
                 f"{'' if seconds else ' (cached: same encoder, same passages)'}, index {built.seconds_index:.1f} s")
            publish(tmp, gen, number=1, manifest_sha256=sha256_file(tmp / MANIFEST_NAME), documents=len(docs),
                    index=IndexSpec(path=INDEX_FILE, metric=built.metric, dtype=built.dtype, ndim=built.ndim,
                                    count=built.count, connectivity=built.connectivity,
                                    expansion_search=built.expansion_search),
                    passages=PassagesSpec(data=DATA_FILE, offsets=OFFSETS_FILE, count=built.count))
        Bundle.open(tmp, verify=True)           # the reader must accept what the writer wrote
    return Path(cfg.out)
