"""Weight quantization (int8 and int4 MatMulNBits), with a check that it really happened.

The quantizers silently leave some graphs untouched, so every result is inspected for
quantized MatMul nodes. Whether the quantized model still says the same thing is judged by
parity.py, from its greedy output.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ragrt.errors import RagrtError

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
    """int8 weights in blocks of 32 (MatMulNBits) computing in fp32; the word-embedding table stays fp32.

    Chosen on the fine-tuned MiniLM and the FAQ dev split (36 questions, ~4k candidate
    passages, ranks against the fp32 graph's): with int8 activations (accuracy level 4) and an
    int8 embedding table, min cosine 0.9985 and 3 questions changed rank; without the int8
    table 0.9994 and 2; with fp32 compute and no int8 table 0.9997 and 1, and none when only
    the queries take the int8 graph (the export embeds passages with fp32). The table is
    most of the remaining size (47 MB of 60).
    """
    _weight_only(src, dst, bits=8, block_size=32, accuracy_level=1)
    return _report(src, dst)


def quantize_encoder_w8a8(src: Path, dst: Path) -> QuantReport:
    """int8 weights, one scale per output channel, and int8 activations quantized on each call
    (onnxruntime's quantize_dynamic: MatMulInteger, which VNNI runs four multiply-adds at a
    time); only the weight MatMuls, so the word-embedding table and attention stay fp32.

    Measured on the development machine (2-core Zen 4 with AVX-512 VNNI), batch 1: 130-134
    Python-docs passages/s against 39-40 for sentence-transformers (benchmarks/encoding.py),
    where quantize_encoder's graph (int8 weights computing in fp32) managed 42-44. Cosine
    against PyTorch: mean 0.9942, min 0.9907 (export parity, all-MiniLM-L6-v2).

    The cost: on the FAQ splits with the fine-tuned encoder (passages embedded in fp32,
    questions through this graph) recall@5 and @10 equal fp32 queries' but one question fewer
    is found at rank 1 on each split (test 0.537 against 0.561, dev 0.444 against 0.472),
    where quantize_encoder's graph matches fp32 exactly; and in the real-model tests a
    different fifth passage turned base SmolLM2's answer to "How do I copy an object?" into
    repeated lines. So it is opt-in (`ragrt export --encoder-quantize w8a8`).
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
