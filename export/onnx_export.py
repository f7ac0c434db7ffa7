"""PyTorch checkpoints -> ONNX graphs in the shapes the engine's contract names."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from engine.errors import RagrtError
from engine.manifest import GeneratorIO

INT64_MAX = 2**63 - 1


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


def export_encoder(checkpoint: Path, out_dir: Path, *, max_length: int = 256) -> EncoderExport:
    """Encoder + mean pooling + L2 norm in one graph: the engine gets finished embeddings."""
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModel

    # Eager attention: the SDPA path drops an all-ones mask while tracing and bakes that in.
    model = AutoModel.from_pretrained(checkpoint, attn_implementation="eager")

    class Pooled(torch.nn.Module):
        def __init__(self, encoder):
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids, attention_mask):
            h = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=torch.zeros_like(input_ids)).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1)

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
    tok = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    tok.no_padding()               # the engine pads each batch to its own longest row
    tok.enable_truncation(max_length)
    tok.save(str(out_dir / "tokenizer.json"))
    return EncoderExport(out_dir / "model.onnx", out_dir / "tokenizer.json", model.config.hidden_size, max_length)


def export_generator(checkpoint: Path, out_dir: Path) -> GeneratorExport:
    """optimum's decoder-with-past export, plus a `num_logits` input (see `add_num_logits`)."""
    import onnx
    from optimum.exporters.onnx import main_export
    from transformers import AutoConfig, AutoTokenizer

    tmp = out_dir / "optimum"
    main_export(str(checkpoint), output=str(tmp), task="text-generation-with-past", do_validation=False)
    model = onnx.load(str(tmp / "model.onnx"))
    add_num_logits(model, GeneratorIO())
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out_dir / "model.onnx"))
    shutil.rmtree(tmp)

    config = AutoConfig.from_pretrained(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    tokenizer.backend_tokenizer.save(str(out_dir / "tokenizer.json"))
    eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    # Chat models end a turn with <|im_end|> even when the config names another EOS.
    eos_ids = tuple(dict.fromkeys([t for t in eos if t is not None] +
                                  ([im_end] if im_end is not None and im_end != tokenizer.unk_token_id else [])))
    if not eos_ids:
        raise RagrtError(f"{checkpoint}: the generator config names no eos_token_id")
    heads = config.num_attention_heads
    return GeneratorExport(
        model=out_dir / "model.onnx", tokenizer=out_dir / "tokenizer.json",
        num_layers=config.num_hidden_layers, num_kv_heads=getattr(config, "num_key_value_heads", heads),
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        vocab_size=config.vocab_size, eos_token_ids=eos_ids,
        pad_token_id=config.pad_token_id if config.pad_token_id is not None else eos_ids[0],
        max_position_embeddings=config.max_position_embeddings,
        chat_template=tokenizer.chat_template)


def add_num_logits(model, io: GeneratorIO) -> None:
    """Computes the LM head for the last `num_logits` positions only.

    Without it a 700-token prefill returns 700 x 49152 floats (137 MB) per row, when
    decoding needs one position and RAG-Sequence scoring needs a continuation's worth.
    """
    from onnx import TensorProto, helper

    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    head = producer.get(io.logits)
    if head is None or head.op_type not in ("MatMul", "Gemm"):
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

