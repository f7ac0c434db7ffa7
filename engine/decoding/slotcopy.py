"""The graph that copies one KV cache slot on the device: y = Pad(Slice(x, starts, ends, axes), pads).

onnxruntime's Python API cannot copy part of a device buffer, but a session on that device
can, with its inputs and outputs bound by address. The runtime does not depend on the `onnx`
package, so the five-field ModelProto is written out here; tests check it with onnx's own
checker.
"""
from __future__ import annotations

import numpy as np

ELEMENT_TYPES = {"float32": 1, "float16": 10}      # onnx.TensorProto.DataType
INT64 = 7
OPSET = 18
IR_VERSION = 8
INPUTS = ("x", "starts", "ends", "axes", "pads")
SLOT = ("slots", "heads", "positions", "head_dim")


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _int(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)


def _bytes(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _str(field: int, text: str) -> bytes:
    return _bytes(field, text.encode())


def _value(name: str, element_type: int, dims: tuple[int | str, ...]) -> bytes:
    """ValueInfoProto: a name and a tensor type; a str dim is symbolic."""
    shape = b"".join(_bytes(1, _str(2, d) if isinstance(d, str) else _int(1, d)) for d in dims)
    return _str(1, name) + _bytes(2, _bytes(1, _int(1, element_type) + _bytes(2, shape)))


def _node(op: str, inputs: tuple[str, ...], output: str) -> bytes:
    return b"".join(_str(1, i) for i in inputs) + _str(2, output) + _str(4, op)


def slot_copy_model(dtype: np.dtype) -> bytes:
    """Serialized ModelProto for a cache of this float type."""
    element = ELEMENT_TYPES[np.dtype(dtype).name]
    graph = (_bytes(1, _node("Slice", INPUTS[:4], "part")) + _bytes(1, _node("Pad", ("part", "pads"), "y"))
             + _str(2, "slot_copy")
             + _bytes(11, _value("x", element, SLOT))
             + b"".join(_bytes(11, _value(name, INT64, (1,))) for name in INPUTS[1:4])
             + _bytes(11, _value("pads", INT64, (8,)))
             + _bytes(12, _value("y", element, SLOT)))
    return _int(1, IR_VERSION) + _bytes(7, graph) + _bytes(8, _int(2, OPSET))
