"""PyTorch checkpoints -> ONNX graphs in the shapes the engine's contract names."""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from ragrt.errors import RagrtError
from ragrt.bundle.manifest import PACKED_IO, GeneratorIO

INT64_MAX = 2**63 - 1
PROTOBUF_LIMIT = 2**31 - 1         # bytes; a bigger graph must keep its weights in an external file


@dataclass(frozen=True)
class EncoderExport:
    model: Path
    tokenizer: Path
    dim: int
    max_length: int


@dataclass(frozen=True)
class GeneratorExport:
    model: Path
    tokenizer: Path
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    max_position_embeddings: int
    chat_template: str | None
    bos_token: str | None          # what a prompt starts with, if the chat template or tokenizer adds one


def export_encoder(checkpoint: Path, out_dir: Path, *, max_length: int = 256, pooling: str = "mean") -> EncoderExport:
    """Encoder + pooling (`mean` over the mask, or `cls`: the first token's state) + L2 norm in one
    graph: the engine gets finished embeddings."""
    import torch
    from transformers import AutoModel

    # Eager attention: the SDPA path drops an all-ones mask while tracing and bakes that in.
    model = AutoModel.from_pretrained(checkpoint, attn_implementation="eager")
    if max_length > model.config.max_position_embeddings:
        raise RagrtError(f"encoder max_length {max_length} exceeds the model's "
                         f"{model.config.max_position_embeddings} positions")

    class Pooled(torch.nn.Module):
        def __init__(self, encoder):
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids, attention_mask):
            h = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=torch.zeros_like(input_ids)).last_hidden_state
            return torch.nn.functional.normalize(pool(h, attention_mask, pooling), dim=-1)

    # eval() on the wrapper itself: the exporter restores the wrapper's training flag
    # recursively afterwards, which would otherwise switch dropout on in the encoder.
    wrapper = Pooled(model).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102], [101, 2460, 102, 0, 0, 0]])
    mask = (ids != 0).long()
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
            "embedding": {0: "batch"}}
    torch.onnx.export(wrapper, (ids % model.config.vocab_size, mask), str(out_dir / "model.onnx"), dynamo=False,
                      input_names=["input_ids", "attention_mask"], output_names=["embedding"],
                      dynamic_axes=axes, opset_version=17)
    tok = _backend_tokenizer(checkpoint)
    tok.no_padding()               # the engine pads each batch to its own longest row
    tok.enable_truncation(max_length)
    tok.save(str(out_dir / "tokenizer.json"))
    return EncoderExport(out_dir / "model.onnx", out_dir / "tokenizer.json", model.config.hidden_size, max_length)


def pool(h, attention_mask, pooling: str):
    """(batch, seq, hidden) token states -> (batch, hidden), as sentence-transformers pools them."""
    if pooling == "cls":
        return h[:, 0]
    mask = attention_mask.unsqueeze(-1).to(h.dtype)
    return (h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def _backend_tokenizer(checkpoint: Path):
    """The checkpoint's tokenizers.Tokenizer: its tokenizer.json, else converted from vocab files."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer
    if (checkpoint / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(checkpoint)
    if not hf.is_fast:
        raise RagrtError(f"{checkpoint}: no tokenizer.json and no fast tokenizer to convert it from")
    return Tokenizer.from_str(hf.backend_tokenizer.to_str())


def export_generator(checkpoint: Path, out_dir: Path) -> GeneratorExport:
    """optimum's decoder-with-past export, plus a `num_logits` input (see `add_num_logits`)."""
    import onnx
    from optimum.exporters.onnx import main_export

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".optimum.", dir=out_dir) as tmp:
        main_export(str(checkpoint), output=tmp, task="text-generation-with-past", do_validation=False)
        # onnx.load pulls in model.onnx_data if optimum wrote one
        _save_with_num_logits(onnx.load(str(Path(tmp) / "model.onnx")), out_dir)
    return describe_generator(checkpoint, out_dir)


# Builder options per precision. int4 keeps the builder's blocks of 32, the fast kernel's, and
# gets its accuracy from AWQ scaling of the checkpoint beforehand (awq.py) and GPTQ rounding of
# the graph's weights afterwards (gptq.py). fp16 is the builder's CUDA graph; onnxruntime's CPU
# provider runs it too (slower than fp32), which is how its parity is measured without a GPU.
# int8 takes blocks of 64, which its int8-compute kernel runs faster than 32 and, unlike 128,
# with the same numbers whatever the batch (benchmarks/README.md, "int8 weight blocks").
FUSED_PRECISIONS = {"fp32": (), "int8": ("block_size=64",), "int4": (), "fp16": ()}
# The builder's default for sliding-window layers (Gemma 3's) is a window-sized ring buffer that its
# attention evicts by position (GroupQueryAttention's sliding_window_cache), which neither the packed
# cache (one capacity for all layers, a key's index is its position) nor passage KV can follow.
# Full-length caches with the window applied by the attention's mask (local_window_size) can.
FULL_WINDOW_CACHES = ("windowed_kv_cache=false",)


def builder_options(checkpoint: Path, precision: str) -> tuple[str, ...]:
    """The builder's --extra_options for this checkpoint and precision: part of the cache recipe."""
    import json
    config = json.loads((Path(checkpoint) / "config.json").read_text())
    return FUSED_PRECISIONS[precision] + (FULL_WINDOW_CACHES if config.get("sliding_window") else ())


def export_generator_fused(checkpoint: Path, out_dir: Path, precision: str) -> GeneratorExport:
    """onnxruntime-genai's builder graph (see genai_build.py), plus the `num_logits` input and
    with row lengths in place of the attention mask (`use_length_inputs`).

    Its attention is GroupQueryAttention, which reads each row's cache as one unpadded run,
    so the manifest marks it `cache: packed`. int8 and int4 are weight-only MatMulNBits with
    int8 compute.
    """
    import subprocess
    import sys

    import onnx
    if precision not in FUSED_PRECISIONS:
        raise RagrtError(f"the fused generator graph comes in {', '.join(FUSED_PRECISIONS)}, not {precision}")
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".builder.", dir=out_dir) as tmp:
        # The builder runs in `tmp`, so every path it gets is absolute: a relative checkpoint
        # would read as a model hub id there.
        tmp = str(Path(tmp).resolve())
        cmd = [sys.executable, "-m", "ragrt.export.onnx.genai_build", "-i", str(Path(checkpoint).resolve()),
               "-o", f"{tmp}/out",
               "-p", precision, "-e", "cuda" if precision == "fp16" else "cpu", "-c", f"{tmp}/cache"]
        if options := builder_options(checkpoint, precision):
            cmd += ["--extra_options", *options]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RagrtError(f"onnxruntime-genai's model builder failed on {checkpoint}: {tail[0]} "
                             "(--graph optimum exports it without the fused graph, and so without passage KV)")
        model = onnx.load(f"{tmp}/out/model.onnx")
        use_length_inputs(model, PACKED_IO)
        _save_with_num_logits(model, out_dir)
    return describe_generator(checkpoint, out_dir)


def _save_with_num_logits(model, out_dir: Path) -> None:
    import onnx
    add_num_logits(model, GeneratorIO())
    big = model.ByteSize() > PROTOBUF_LIMIT
    onnx.save(model, str(out_dir / "model.onnx"), save_as_external_data=big, location="model.onnx_data")


# The end-of-turn tokens of the chat templates of ChatML (SmolLM2, Qwen), Gemma, Llama 3 and Phi-3.
END_OF_TURN = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>")


def describe_generator(checkpoint: Path, out_dir: Path) -> GeneratorExport:
    """Dimensions, stop tokens and chat template from the checkpoint; writes tokenizer.json."""
    from tokenizers import Tokenizer
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    # The engine budgets prompt tokens itself; a truncation setting would cut prompts silently.
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_truncation()
    backend.no_padding()
    backend.save(str(out_dir / "tokenizer.json"))
    eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    # Chat templates end a turn with their own token even when the config names another EOS
    # (a base model's GGUF, such as Gemma 3 270M's, names only <eos>).
    turn_ends = [tokenizer.convert_tokens_to_ids(t) for t in END_OF_TURN if t in str(tokenizer.chat_template or "")]
    eos_ids = tuple(dict.fromkeys([t for t in eos + turn_ends if t is not None and t != tokenizer.unk_token_id]))
    if not eos_ids:
        raise RagrtError(f"{checkpoint}: the generator config names no eos_token_id")
    heads = config.num_attention_heads
    return GeneratorExport(
        model=out_dir / "model.onnx", tokenizer=out_dir / "tokenizer.json",
        num_layers=config.num_hidden_layers, num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        vocab_size=config.vocab_size, eos_token_ids=eos_ids,
        pad_token_id=config.pad_token_id if config.pad_token_id is not None else eos_ids[0],
        max_position_embeddings=config.max_position_embeddings,
        chat_template=tokenizer.chat_template, bos_token=_bos_token(tokenizer))


def _bos_token(tokenizer) -> str | None:
    """The BOS token if the chat template writes it or the tokenizer prepends it on encoding.

    The engine encodes prompts without special tokens, so a BOS that only the tokenizer's
    post-processor adds must be written into the prompt by whoever builds it.
    """
    bos = tokenizer.bos_token
    if bos is None:
        return None
    if "bos_token" in str(tokenizer.chat_template or ""):
        return bos
    ids = tokenizer("x")["input_ids"]
    return bos if ids and ids[0] == tokenizer.bos_token_id else None


def use_length_inputs(model, io: GeneratorIO) -> None:
    """Feeds every GroupQueryAttention its `seqlens_k` and `total_sequence_length` from graph
    inputs named by `io`, dropping the builder's subgraph that derives them from the mask.

    The mask grows by a column each step, so its shape changes on every call; with these
    fixed-shape inputs instead, int4 decoding ran 2 to 4% faster on the development
    machine (bit-identical logits), and six small nodes go.
    """
    from onnx import TensorProto, helper

    graph = model.graph
    attention = [node for node in graph.node if node.op_type == "GroupQueryAttention"]
    derived = {(node.input[5], node.input[6]) for node in attention}
    if len(derived) != 1:
        raise RagrtError(f"expected every GroupQueryAttention to share its length inputs, found {len(derived)} sets")
    for node in attention:
        node.input[5], node.input[6] = io.seqlens_k, io.total_sequence_length
    drop_unused(graph)
    mask = GeneratorIO.attention_mask            # the builder's name for it
    if any(mask in node.input for node in graph.node):
        raise RagrtError(f"the graph still reads {mask!r} after taking lengths as inputs")
    inputs = [i for i in graph.input if i.name != mask]
    inputs[1:1] = [helper.make_tensor_value_info(io.seqlens_k, TensorProto.INT32, ["batch_size"]),
                   helper.make_tensor_value_info(io.total_sequence_length, TensorProto.INT32, [])]
    del graph.input[:]
    graph.input.extend(inputs)


def drop_unused(graph) -> None:
    """Removes the nodes no graph output depends on, then the initializers no node reads.
    The node list must be topologically sorted."""
    needed = {out.name for out in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(out in needed for out in node.output):
            kept.append(node)
            needed.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    used = {name for node in graph.node for name in node.input}
    initializers = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(initializers)


def add_num_logits(model, io: GeneratorIO) -> None:
    """Computes the LM head for the last `num_logits` positions only.

    Without it a 700-token prefill returns 700 x 49152 floats (137 MB) per row, when
    decoding needs one position and RAG-Sequence scoring needs a continuation's worth.
    The Slice clamps, so a `num_logits` beyond the sequence (or 0, as -0 = 0) gives all positions.
    """
    from onnx import TensorProto, helper

    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    head = producer.get(io.logits)
    # A MatMul on [batch, seq, hidden]; a Gemm would be 2-D, with no sequence axis to slice.
    if head is None or head.op_type not in ("MatMul", "MatMulNBits"):
        raise RagrtError(f"cannot find the LM head producing {io.logits!r} in the exported graph")
    graph.input.append(helper.make_tensor_value_info(io.num_logits, TensorProto.INT64, [1]))
    graph.initializer.extend([helper.make_tensor("/ragrt/int64_max", TensorProto.INT64, [1], [INT64_MAX]),
                              helper.make_tensor("/ragrt/axis_1", TensorProto.INT64, [1], [1])])
    neg = helper.make_node("Neg", [io.num_logits], ["/ragrt/neg_num_logits"], name="/ragrt/Neg")
    last = helper.make_node("Slice", [head.input[0], "/ragrt/neg_num_logits", "/ragrt/int64_max", "/ragrt/axis_1"],
                            ["/ragrt/last_hidden"], name="/ragrt/Slice")
    head.input[0] = "/ragrt/last_hidden"
    nodes = list(graph.node)
    at = nodes.index(head)
    del graph.node[:]
    graph.node.extend(nodes[:at] + [neg, last] + nodes[at:])     # keep the node list topologically sorted
    for out in graph.output:
        if out.name == io.logits:
            out.type.tensor_type.shape.dim[1].dim_param = io.num_logits



# Rotary types whose frequencies are fixed and whose cos/sin are not scaled (attention factor 1),
# so R(a)R(b) = R(a + b) holds and a cached key turns exactly; dynamic, yarn and longrope do not.
STATIC_ROTARY = ("default", "linear", "llama3")


def graph_rotary(checkpoint: Path, graph: Path) -> tuple[dict, str]:
    """The GeneratorSpec rotary fields of a fused graph, and "" ; or no fields and the reason
    passage KV cannot turn this graph's keys exactly.

    Each layer's frequencies come from the checkpoint's config as transformers computes them
    (partial rotary, scaled rotary, Gemma 3's local base on sliding-window layers) and are kept
    only where they reproduce the cos/sin table that layer's attention reads."""
    import copy

    import numpy as np
    import onnx
    from onnx import numpy_helper
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = AutoConfig.from_pretrained(checkpoint)
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if not getattr(config, "rope_theta", None):
        return {}, "the checkpoint's config names no rotary base (rope_theta)"
    if kind not in STATIC_ROTARY:
        return {}, (f"its {kind!r} rotary scales cos/sin or changes with the length, so a cached key "
                    "cannot be turned to a new position exactly")
    local_base = getattr(config, "rope_local_base_freq", None)
    local = tuple(i for i, t in enumerate(getattr(config, "layer_types", None) or [])
                  if local_base and t == "sliding_attention")
    local_config = copy.deepcopy(config)
    local_config.rope_theta, local_config.rope_scaling = local_base, {"rope_type": "default"}
    freqs = {False: ROPE_INIT_FUNCTIONS[kind](config, None)[0].double().numpy()}
    if local:
        freqs[True] = ROPE_INIT_FUNCTIONS["default"](local_config, None)[0].double().numpy()

    model = onnx.load(str(graph), load_external_data=False)
    tables = {t.name: t for t in model.graph.initializer}
    attention = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    for layer, node in enumerate(attention):
        rotary = any(a.name == "do_rotary" and a.i == 1 for a in node.attribute)
        cos, sin = (tables.get(name) for name in node.input[7:9])
        if not rotary or cos is None or sin is None or onnx.TensorProto.EXTERNAL in (cos.data_location,
                                                                                    sin.data_location):
            return {}, f"layer {layer}'s attention reads no rotary table of its own"
        want = np.arange(cos.dims[0])[:, None] * freqs[layer in local]
        if not (cos.dims[1] == len(freqs[layer in local])
                and np.allclose(numpy_helper.to_array(cos), np.cos(want), atol=1e-3)
                and np.allclose(numpy_helper.to_array(sin), np.sin(want), atol=1e-3)):
            return {}, f"layer {layer}'s rotary table is not the checkpoint's rotary"
    interleaved = {a.i for n in attention for a in n.attribute if a.name == "rotary_interleaved"}
    if len(interleaved) > 1:
        return {}, "its layers pair rotary dims differently"
    return {"rotary_base": float(config.rope_theta), "rotary_dim": 2 * len(freqs[False]),
            "rotary_interleaved": interleaved == {1},
            "rotary_inv_freq": tuple(float(f) for f in freqs[False]) if kind != "default" else (),
            "local_rotary_layers": local, "rotary_local_base": float(local_base) if local else 0.0}, ""
