"""Weight quantization (int8 and int4 MatMulNBits), with a check that it really happened.

The quantizers silently leave some graphs untouched, so every result is inspected for
quantized MatMul nodes. Whether the quantized model still says the same thing is judged by
parity.py, from its greedy output.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from engine.errors import RagrtError

QUANTIZED_OPS = ("MatMulInteger", "DynamicQuantizeLinear", "MatMulNBits", "QLinearMatMul", "DynamicQuantizeMatMul")


@dataclass(frozen=True)
class QuantReport:
    bytes_before: int
    bytes_after: int
    matmul_before: int             # fp32 MatMul nodes before
    matmul_after: int              # fp32 MatMul nodes left: activation x activation (attention, rotary),
                                   # and those whose weight is computed, like SmolLM2's tied LM head (a Transpose)
    quantized_ops: dict[str, int]  # op type -> count, for the QUANTIZED_OPS present after


def op_counts(path: Path) -> Counter:
    import onnx
    model = onnx.load(str(path), load_external_data=False)
    return Counter(node.op_type for node in model.graph.node)


def _report(src: Path, dst: Path) -> QuantReport:
    after = op_counts(dst)
    quantized = {op: after[op] for op in QUANTIZED_OPS if after[op]}
    if not quantized:
        raise RagrtError(f"quantizing {src} produced no quantized MatMul nodes; the graph was left in fp32")
    return QuantReport(src.stat().st_size, dst.stat().st_size, op_counts(src)["MatMul"], after["MatMul"], quantized)


def _weight_only(src: Path, dst: Path, *, bits: int, block_size: int, accuracy_level: int) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    dst.parent.mkdir(parents=True, exist_ok=True)
    quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), bits=bits, block_size=block_size, is_symmetric=True,
                                     accuracy_level=accuracy_level)
    quantizer.process()
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=False)


def quantize_encoder(src: Path, dst: Path) -> QuantReport:
    """int8 weights, one scale per output channel, and int8 activations quantized on each call
    (onnxruntime's quantize_dynamic: MatMulInteger, which VNNI runs four multiply-adds at a
    time); only the weight MatMuls, so the word-embedding table and attention stay fp32.

    Measured on the development machine (2-core Zen 4 with AVX-512 VNNI), batch 1: 130-134
    Python-docs passages/s against 39-40 for sentence-transformers (benchmarks/encoding.py),
    where int8 weights computing in fp32 (MatMulNBits, accuracy level 1, the earlier choice)
    managed 42-44. Fidelity: cosine against PyTorch mean 0.9942, min 0.9907 (export parity,
    all-MiniLM-L6-v2). On the FAQ splits with the fine-tuned encoder, the passages embedded
    in fp32 and the questions through this graph gave recall@5 and @10 equal to fp32 queries
    and one question fewer at rank 1 on each split (test 0.537 against 0.561, dev 0.444
    against 0.472); the fp32-compute graph had matched fp32 exactly. The corpus itself is
    embedded with the fp32 graph (pipeline.py), so this graph embeds queries and the passages
    `ragrt index add` adds.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    dst.parent.mkdir(parents=True, exist_ok=True)
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"],
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return _report(src, dst)


def quantize_generator(src: Path, dst: Path) -> QuantReport:
    """int8 weights in blocks of 32 (MatMulNBits, int8 compute).

    The AVX2 int16 saturation that turned plain dynamic QInt8 SmolLM2 into garbage does not
    arise here. Measured on the fine-tuned SmolLM2 (20 prompts x 24 tokens vs PyTorch):
    teacher-forced top-1 0.986 and 50.8 tok/s, against 0.962 and 42.6 tok/s for dynamic int8
    with reduce_range. Not batch-invariant: on SmolLM2 a row's logits moved by up to 0.43
    between running alone and in a batch, and by 0.30 between a one-token step and a
    multi-token pass, so the manifest says batch_invariant false.
    """
    _weight_only(src, dst, bits=8, block_size=32, accuracy_level=4)
    return _report(src, dst)


def quantize_generator_int4(src: Path, dst: Path, *, block_size: int = 16) -> QuantReport:
    """Weight-only int4 (MatMulNBits, symmetric blocks of 16) computing in fp32.

    Decoding reads a quarter of the fp32 weight bytes. accuracy_level=1 keeps fp32 compute;
    level 4 (int8 activations) broke batch invariance for int4. Measured on SmolLM2
    (teacher-forced top-1 vs PyTorch): blocks of 32 give 0.794, of 16 give 0.846, at the same
    decode speed.
    """
    _weight_only(src, dst, bits=4, block_size=block_size, accuracy_level=1)
    return _report(src, dst)
