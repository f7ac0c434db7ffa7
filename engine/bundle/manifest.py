"""The bundle manifest: the one contract between `export/` (writer) and `engine/` (reader).

`docs/bundle.md` describes every field. Both sides use these dataclasses, so a field
cannot be written under one name and read under another. Unknown keys are kept out of
the dataclasses on purpose: a bundle from a newer *minor* writer still opens, while a
newer `schema_version` is refused.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ragrt.decoding.sampling import DecodingDefaults
from ragrt.errors import BundleError, UserInputError
from ragrt.extract import ExtractSettings

SCHEMA = "ragrt.bundle"
SCHEMA_VERSION = 7
# Version 2 moved the index and the passage store into corpus generations (bundle/versions.py).
# Version 3 lets a packed graph take each row's length (io.seqlens_k, io.total_sequence_length)
# in place of an attention mask, which a version-2 reader would still try to feed.
# Version 4 lets a corpus generation hold several index shards (GenerationSpec.shards), of which a
# version-3 reader would search only the first.
# Version 5 lets a passage store hold several data files (PassagesSpec.segments), of which a
# version-4 reader would read only the first. `ragrt index add` makes them, and never rewrites the
# manifest (the generation seals its sha256), so generation.json carries its own schema_version.
# Version 6 lets a packed graph keep its cache in int8 (GeneratorSpec.kv_dtype "int8", with
# kv_scales), which a version-5 reader would bind as a float cache. Export no longer writes such
# graphs: an int8 cache now lives in a step graph (GeneratorSpec.step_model) beside the float one,
# which older readers ignore, decoding with `model` alone, so it needs no version of its own.
# Nor do a generation's BM25 index (GenerationSpec.bm25) and rag.retrieval: older readers ignore
# both and answer with dense retrieval, as they always did.
# Version 7 lets the default answer mode be "extract" (RagDefaults.mode), which a version-6 reader
# would refuse on every request that takes the default. It also records per-layer and scaled rotary
# (GeneratorSpec.rotary_inv_freq, local_rotary_layers), which a version-6 reader would turn passage KV
# keys without, and the encoder's query and passage prefixes (EncoderSpec), which it would not prepend.
FIRST_READABLE_VERSION = 2
GENERATION_SCHEMA = "ragrt.generation"
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int


@dataclass(frozen=True)
class ModelSource:
    """Where a model came from: a name a person recognises and the hash of its weights."""
    name: str
    sha256: str


@dataclass(frozen=True)
class EncoderSpec:
    model: str                     # ONNX graph, `inputs` -> output
    tokenizer: str                 # tokenizers' tokenizer.json
    dim: int
    max_length: int                # tokens; longer inputs are truncated
    output: str                    # pooled, L2-normalised embedding [batch, dim]
    quantization: str              # "int8" | "w8a8" | "fp32"
    source: ModelSource
    # Exactly the graph's inputs: input_ids and attention_mask, and token_type_ids (fed zeros)
    # for graphs that kept it.
    inputs: tuple[str, ...] = ("input_ids", "attention_mask")
    pooling: str = "mean"          # "mean" | "cls", done inside the graph
    # Put before each question and each passage before embedding (e5's "query: " / "passage: ",
    # bge's query instruction); since schema 7.
    query_prefix: str = ""
    passage_prefix: str = ""


@dataclass(frozen=True)
class GeneratorIO:
    """ONNX names; `{layer}` is replaced by the layer number. An empty name: no such input."""
    input_ids: str = "input_ids"
    attention_mask: str = "attention_mask"
    # Packed graphs since schema 3: int32 [B] (each row's length after this pass, minus one)
    # and an int32 scalar (the longest row's), the inputs GroupQueryAttention itself takes.
    seqlens_k: str = ""
    total_sequence_length: str = ""
    position_ids: str = "position_ids"  # "" when the graph derives positions from the mask (fused graphs)
    num_logits: str = "num_logits"     # int64 [1]: logits are returned for the last N positions only
    past_key: str = "past_key_values.{layer}.key"
    past_value: str = "past_key_values.{layer}.value"
    present_key: str = "present.{layer}.key"
    present_value: str = "present.{layer}.value"
    logits: str = "logits"


# How the fused export names a packed graph's inputs.
PACKED_IO = GeneratorIO(attention_mask="", position_ids="", seqlens_k="seqlens_k",
                        total_sequence_length="total_sequence_length")


# The assembly graph's inputs beyond `model`'s (GeneratorSpec.assemble_model).
ASSEMBLE_POSITIONS = "position_ids"
ASSEMBLE_BIAS = "attention_bias"


@dataclass(frozen=True)
class GeneratorSpec:
    model: str
    tokenizer: str
    quantization: str              # "int8" | "w8a8" | "int4" | "fp32" | "fp16"
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    max_context: int               # prompt + new tokens never exceed this
    source: ModelSource
    kv_dtype: str = "float32"      # "float32" | "float16" | "int8" (a packed graph of schema 6 that caches in int8)
    # A second graph for decode steps (`--kv-cache int8`): the same weights (one external data file
    # beside both), its packed cache in int8. `model` prefills in float, and a row's cache is
    # quantized when it starts stepping. "" : `model` does everything. Older readers ignore it.
    step_model: str = ""
    # The prefill graph over the same weights with token positions and an attention bias given
    # (export/onnx/assemble_graph.py): passage KV repairs every block and prefills the tail in one
    # run with it. "": one run per repaired block. Older readers ignore it.
    assemble_model: str = ""
    # The int8 cache's per-channel scales, a float32 .npy (decoding/kvquant.py); "" without one.
    kv_scales: str = ""
    # A second step graph over the same int8 cache with its own int4 weights (`int4_step_weights`;
    # `ragrt export --step-weights`), for passes of at most `int4_step_rows` rows: int4 decodes one
    # row faster than int8 and a batch of 8 slower. "": none. Older readers ignore both.
    int4_step_model: str = ""
    int4_step_rows: int = 0
    # Measured by the export's parity check: whether greedy tokens stay the same when rows
    # share a pass (else batches run row by row), when a cached prompt start stands in for its
    # prefill (else no prefix cache), and when drafts are checked several tokens per pass
    # (else no prompt-lookup drafts). Kernels that round differently by shape (int8
    # activations) can fail any of them.
    batch_invariant: bool = True
    prefix_exact: bool = False
    drafts_exact: bool = False
    # "masked": any 0/1 attention mask works (padding, masked-out positions) and positions
    # are fed. "packed": fused attention (GroupQueryAttention) takes each row's cache as its
    # first sum(mask) positions, so rows run unpadded and prefill one at a time; the engine
    # binds each past to its present so the keys and values are written in place.
    cache: str = "masked"
    io: GeneratorIO = field(default_factory=GeneratorIO)
    # Rotary positions as the graph applies them to keys (base, rotated dims, pair layout),
    # checked against the graph's own table at export; passage KV turns cached keys with
    # them. A base of 0 means unknown, and no passage KV.
    rotary_base: float = 0.0
    rotary_dim: int = 0
    rotary_interleaved: bool = False
    # Where layers differ from rotary_base's plain frequencies base ** (-2i / dim), each checked
    # against the graph's table like it (schema 7). Scaled rotary (Llama 3.x's `llama3`, `linear`):
    # the frequencies themselves. Gemma 3's sliding-window layers: their own base.
    rotary_inv_freq: tuple[float, ...] = ()
    local_rotary_layers: tuple[int, ...] = ()
    rotary_local_base: float = 0.0
    # Prompt-lookup drafts where not `drafts_exact` too: the export found the answers unchanged
    # within noise on `--dev` questions (parity.drafts holds the figures).
    drafts: bool = False

    @property
    def weights(self) -> str:
        """The external weights file `model`, `step_model` and `assemble_model` share; absent where
        `model` holds its own."""
        return self.model + ".data"

    @property
    def int4_step_weights(self) -> str:
        """The int4 step graph's own weights file."""
        return self.int4_step_model + ".data"


@dataclass(frozen=True)
class TaskPrompt:
    system: str
    user: str                      # holds {context} and {question} (the topic, for summarize)


@dataclass(frozen=True)
class PromptSpec:
    """Templates with `{name}` placeholders, filled in one pass (values are never re-expanded).

    `chat` is the generator's chat template rendered once at export time, so the engine
    needs no Jinja: it holds `{system}` and `{user}`. `system` and `user` are the question-
    answering task; `tasks` holds the others (bundles written before tasks existed have none).
    """
    chat: str
    system: str
    user: str                      # holds {context} and {question}
    passage: str                   # holds {n}, {title} and {text}
    passage_separator: str = "\n\n"
    tasks: dict[str, TaskPrompt] = field(default_factory=dict)
    # Dialogue: earlier turns go in front of the question inside the user message, because
    # the rendered chat template has one user slot.
    history: str = "Earlier in this conversation:\n{turns}\n\n"
    turn: str = "{role}: {text}"   # role is "User" or "Assistant"

    def task(self, name: str) -> TaskPrompt:
        if name == "qa":
            return TaskPrompt(self.system, self.user)
        if name not in self.tasks:
            known = ", ".join(["qa", *sorted(self.tasks)])
            raise UserInputError(f"task must be one of {known} for this bundle, got {name!r}"
                                 + ("" if self.tasks else " (re-export the bundle for the other tasks)"))
        return self.tasks[name]


@dataclass(frozen=True)
class ChunkingSpec:
    """How documents became passages; `ragrt index add` chunks new documents the same way."""
    max_tokens: int                # encoder tokens per passage
    overlap: int                   # tokens shared by consecutive passages of a document


@dataclass(frozen=True)
class IndexSpec:
    path: str
    metric: str                    # "cos"
    dtype: str                     # "f16" | "i8" | "f32"
    ndim: int
    count: int                     # vectors, under keys 0..count-1: rows from the shard's first (retrieval/shards.py)
    connectivity: int
    expansion_search: int
    # i8 only: stored int8 = round(unit vector × i8_scale), clipped to ±127; queries are cast the same
    # way (retrieval/index.py). None: usearch's own cast (× 127), as bundles written before it.
    i8_scale: float | None = None


@dataclass(frozen=True)
class Bm25Spec:
    """A BM25 index of the generation's passages (retrieval/bm25.py): document i is passage row i."""
    path: str                      # the directory of bm25s's files
    files: tuple[str, ...]         # their names, which the generation's checksums must cover
    count: int                     # documents
    tokenizer: str                 # how words were cut; queries must be cut the same way

    @property
    def paths(self) -> list[str]:
        return [f"{self.path}/{name}" for name in self.files]


@dataclass(frozen=True)
class PassagesSpec:
    """UTF-8 JSON records {"id", "title", "text"} in one data file or, since schema 5, in several
    (segments), read as one concatenation: `data`, then each of `segments`."""
    data: str                      # the first data file
    # The row table, .npy uint64. One data file: [count + 1], record i is data[offsets[i]:offsets[i+1]].
    # With segments: [count, 2], record i is concatenation[offsets[i, 0]:offsets[i, 1]].
    offsets: str
    count: int
    segments: tuple[str, ...] = ()  # the data files after `data` (retrieval/passages.py)

    @property
    def data_files(self) -> tuple[str, ...]:
        return (self.data, *self.segments)


@dataclass(frozen=True)
class RagDefaults:
    k: int = 5
    mode: str = "concat"           # "concat" | "token" | "sequence" | "extract"
    temperature: float = 0.05      # P(c|q) = softmax(cosine / temperature)
    max_new_tokens: int = 128
    # Bundles written before decoding options existed decode greedily, as they always did.
    decoding: DecodingDefaults = field(default_factory=DecodingDefaults)
    # "on" where the export measured block-mode answers as good as full prefill (see docs/bundle.md).
    passage_kv: str = "off"
    # Tokens at the start of each block after the first that are run again over the assembled cache, so
    # they attend to the passages before them (EPIC, arXiv 2410.15332); bundles before it: none.
    passage_kv_repair: int = 0
    # How mode "extract" picks sentences; older bundles take the defaults.
    extract: ExtractSettings = field(default_factory=ExtractSettings)
    # "dense" | "bm25" | "hybrid", chosen by the export on `--dev` recall@5 (bundles before it: dense).
    retrieval: str = "dense"
    retrieval_reason: str = ""


@dataclass(frozen=True)
class CorpusProvenance:
    """The corpus as the export read it; the current counts are in the corpus generation."""
    source: str                    # the path given to `ragrt export --corpus`
    documents: int
    passages: int
    # The encoder graph that embedded these passages ("fp32"); queries, and passages added by
    # `ragrt index add`, go through the bundle's. None: not recorded (bundles from before it was).
    embedded_with: str | None = None


@dataclass(frozen=True)
class EncoderParity:
    """Cosine of each encoder graph's embeddings with PyTorch's, over the parity texts.
    The w8a8 figures are None in bundles exported before that graph existed."""
    fp32_cosine_mean: float
    fp32_cosine_min: float
    int8_cosine_mean: float
    int8_cosine_min: float
    texts: int
    w8a8_cosine_mean: float | None = None
    w8a8_cosine_min: float | None = None


@dataclass(frozen=True)
class GreedyAgreement:
    exact_match: float             # fraction of prompts whose greedy tokens are identical
    prefix_agreement: float        # mean of (common prefix length / longer length)
    teacher_forced_top1: float     # fraction of PyTorch's tokens that are also this graph's top-1, given PyTorch's prefix
    prompts: int
    new_tokens: int
    sample: str                    # first prompt's answer, for a person to read
    # Greedy tokens unchanged (on the first few prompts) with rows in one batch, after a cached
    # prompt start, and with drafts checked in one pass: the engine uses each only if so.
    # False in bundles exported before they were measured.
    batch_invariant: bool = False
    prefix_exact: bool = False
    drafts_exact: bool = False


@dataclass(frozen=True)
class KVCacheParity:
    """The int8 KV cache (`--kv-cache int8`) against the float cache, on the shipped graph."""
    agreement: float               # share of the float cache's greedy tokens the int8 cache also ranks first
    prompts: int
    new_tokens: int
    calibration_tokens: int        # prompt tokens the scales were fitted on
    int4_agreement: float = 0.0    # the same for the int4 step graph (`int4_step_model`); 0.0 without one


@dataclass(frozen=True)
class PassageKVParity:
    """Prompts in blocks from reused passage KV against full prefill, on the shipped generator."""
    trained: bool                  # the generator was fine-tuned with `ragrt finetune --block-attention`
    agreement: float               # share of full prefill's greedy tokens that block mode also ranks first
    prompts: int                   # built-in prompts of 3 passages each
    new_tokens: int
    repair: int = 0                # block mode's `rag.passage_kv_repair` in this measurement
    dev_questions: int = 0         # `ragrt export --dev QA`: answer F1 on them both ways
    f1_full: float | None = None
    f1_blocks: float | None = None


@dataclass(frozen=True)
class DecodingScore:
    """One candidate decoding default on `ragrt export --dev` questions."""
    f1: float
    loop_rate: float               # share of answers that loop (docs/eval.md)


@dataclass(frozen=True)
class DraftParity:
    """Prompt-lookup drafts against one-token steps on the shipped generator (greedy)."""
    agreement: float               # mean share of one-token greedy's tokens that drafted decoding keeps, in order
    prompts: int
    new_tokens: int
    dev_questions: int = 0         # `ragrt export --dev QA`: answer F1 on them with and without drafts
    f1_without: float | None = None
    f1_with: float | None = None


@dataclass(frozen=True)
class ParityReport:
    """What the export measured against PyTorch before writing the bundle."""
    encoder: EncoderParity
    generator: dict[str, GreedyAgreement]   # by quantization, every variant the export built
    used: str                      # the quantization this bundle's generator has
    passage_kv: PassageKVParity | None = None   # None: passage KV unavailable for this bundle
    drafts: DraftParity | None = None           # None: not measured (older bundles)
    kv_cache: KVCacheParity | None = None       # None: a float cache
    # With --dev: each candidate decoding default (labelled by its options) on the dev questions.
    decoding: dict[str, DecodingScore] = field(default_factory=dict)
    # With --dev: each answer mode on the dev questions ("concat" with the chosen decoding, "extract").
    answer_modes: dict[str, DecodingScore] = field(default_factory=dict)


@dataclass(frozen=True)
class Manifest:
    schema: str
    schema_version: int
    ragrt_version: str
    created_at: str
    files: dict[str, FileEntry]
    encoder: EncoderSpec
    generator: GeneratorSpec
    prompt: PromptSpec
    chunking: ChunkingSpec
    corpus: CorpusProvenance
    parity: ParityReport
    rag: RagDefaults = field(default_factory=RagDefaults)
    versions: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str, *, where: str = MANIFEST_NAME) -> "Manifest":
        raw = _json_object(text, where, SCHEMA, "ragrt bundle manifest")
        version = _readable_version(raw, where)
        if version < FIRST_READABLE_VERSION:
            raise BundleError(f"{where}: bundle schema_version {version} predates corpus generations; "
                              f"rebuild it with `ragrt export --force`")
        manifest = _checked(_build(cls, raw, where), where)
        g = manifest.generator
        if g.kv_dtype not in ("float32", "float16", "int8"):
            raise BundleError(f"{where}: generator kv_dtype {g.kv_dtype!r} is not float32, float16 or int8")
        if (g.kv_dtype == "int8" or g.step_model) and (g.cache != "packed" or not g.kv_scales):
            raise BundleError(f"{where}: an int8 KV cache needs a packed graph and its kv_scales")
        if g.int4_step_model and (not g.step_model or g.int4_step_rows < 1):
            raise BundleError(f"{where}: an int4 step graph needs the int8 cache's step_model and int4_step_rows >= 1")
        return manifest

    def referenced_paths(self) -> list[str]:
        return [self.encoder.model, self.encoder.tokenizer, self.generator.model, self.generator.tokenizer,
                *[p for p in (self.generator.step_model, self.generator.assemble_model, self.generator.kv_scales) if p],
                *([self.generator.int4_step_model, self.generator.int4_step_weights]
                  if self.generator.int4_step_model else [])]


@dataclass(frozen=True)
class GenerationSpec:
    """`generation.json`: one immutable version of the corpus (index + passage store). Paths are
    relative to its generation directory."""
    schema: str
    number: int
    created_at: str
    # The manifest's sha256: the vectors mean something only with the encoder that made them,
    # and this seals manifest.json, which lists no checksum of itself.
    manifest_sha256: str
    files: dict[str, FileEntry]
    index: IndexSpec               # the vector index, or its first shard
    passages: PassagesSpec
    documents: int
    # The index's other shards, in row order (retrieval/shards.py); empty: one index.
    shards: tuple[IndexSpec, ...] = ()
    # written_version of this generation, which may need a newer schema than the manifest it was
    # built for; 0: written before generations recorded one (the manifest's version describes them).
    schema_version: int = 0
    # None: no BM25 index (generations written before ragrt kept one), so dense retrieval only.
    bm25: Bm25Spec | None = None

    @property
    def index_shards(self) -> tuple[IndexSpec, ...]:
        return (self.index, *self.shards)

    def to_json(self) -> str:
        raw = dataclasses.asdict(self)
        if not self.shards:
            del raw["shards"]          # a one-shard generation.json reads as before shards existed
        if not self.passages.segments:
            del raw["passages"]["segments"]     # and a one-file store as before segments
        if self.bm25 is None:
            del raw["bm25"]
        return json.dumps(raw, indent=2, sort_keys=True, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str, *, where: str) -> "GenerationSpec":
        raw = _json_object(text, where, GENERATION_SCHEMA, "ragrt corpus generation")
        if "schema_version" in raw:
            _readable_version(raw, where)
        return _checked(_build(cls, raw, where), where)

    def referenced_paths(self) -> list[str]:
        return [*(s.path for s in self.index_shards), *self.passages.data_files, self.passages.offsets,
                *(self.bm25.paths if self.bm25 else ())]


def written_version(*, shards: int, segments: int = 1, mode: str = "concat", model_conventions: bool = False) -> int:
    """The schema_version a bundle (or a corpus generation) is written with: the oldest that describes
    it, so that older ragrt opens every bundle it reads right (git writes repositoryformatversion 0 until
    an extension needs 1). A segmented passage store needs version 5, a sharded index 4; a new version
    adds its own condition here. Export writes one segment. Version 7: the default answer mode is
    extract, or `model_conventions`: the generator's rotary differs by layer or from its base
    (GeneratorSpec.rotary_inv_freq, local_rotary_layers), or the encoder pools by CLS or prefixes its
    texts (EncoderSpec), which an older reader would not apply."""
    if mode == "extract" or model_conventions:
        return 7
    if segments > 1:
        return 5
    return 4 if shards > 1 else 3


def _readable_version(raw: dict, where: str) -> int:
    version = raw.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise BundleError(
            f"{where}: bundle schema_version {version!r} is newer than this ragrt reads "
            f"({SCHEMA_VERSION}); upgrade ragrt")
    return version


def _json_object(text: str, where: str, schema: str, kind: str) -> dict:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise BundleError(f"{where}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(raw, dict) or raw.get("schema") != schema:
        raise BundleError(f"{where}: not a {kind} (schema is not {schema!r})")
    return raw


def _checked(doc, where: str):
    """`doc` (a Manifest or GenerationSpec) once none of its paths leaves the bundle."""
    for path in doc.referenced_paths() + list(doc.files):
        check_relative(path, where)
    return doc


def check_relative(path: str, where: str = MANIFEST_NAME) -> None:
    """A manifest may only name files inside its bundle."""
    p = PurePosixPath(path)
    if not path or p.is_absolute() or "\\" in path or ".." in p.parts or ":" in path:
        raise BundleError(f"{where}: file path {path!r} points outside the bundle")


def _build(tp: Any, raw: Any, where: str) -> Any:
    """Builds dataclass `tp` from parsed JSON, checking types so a bad manifest fails here."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(raw, dict):
            raise BundleError(f"{where}: expected an object for {tp.__name__}")
        hints = typing.get_type_hints(tp)
        kwargs = {}
        for f in dataclasses.fields(tp):
            if f.name in raw:
                kwargs[f.name] = _build(hints[f.name], raw[f.name], f"{where}:{f.name}")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise BundleError(f"{where}: missing field {f.name!r}")
        return tp(**kwargs)
    if origin is dict:
        key_t, val_t = typing.get_args(tp)
        if not isinstance(raw, dict):
            raise BundleError(f"{where}: expected an object")
        return {str(k): _build(val_t, v, f"{where}.{k}") for k, v in raw.items()}
    if origin is types.UnionType:      # the schema's only unions are `X | None`
        if raw is None:
            return None
        (inner,) = [t for t in typing.get_args(tp) if t is not type(None)]
        return _build(inner, raw, where)
    if origin is tuple:
        (item_t, _) = typing.get_args(tp)
        if not isinstance(raw, list):
            raise BundleError(f"{where}: expected a list")
        return tuple(_build(item_t, v, where) for v in raw)
    if tp is float and isinstance(raw, int) and not isinstance(raw, bool):
        return float(raw)
    if not isinstance(raw, tp) or (tp is int and isinstance(raw, bool)):
        raise BundleError(f"{where}: expected {tp.__name__}, got {type(raw).__name__}")
    return raw


def read_manifest(bundle: Path) -> Manifest:
    path = Path(bundle) / MANIFEST_NAME
    if not Path(bundle).is_dir():
        raise BundleError(f"{bundle}: no such bundle directory")
    if not path.is_file():
        raise BundleError(f"{path}: missing; is {bundle} a ragrt bundle?")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise BundleError(f"{path}: not UTF-8 text") from None
    return Manifest.from_json(text, where=str(path))
