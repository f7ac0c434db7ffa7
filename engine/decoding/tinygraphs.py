"""Graphs the runtime writes itself, one node or two each.

- `slot_copy_model` copies one KV cache slot on the device: y = Pad(Slice(x, starts, ends, axes), pads).
  onnxruntime's Python API cannot copy part of a device buffer, but a session on that device can,
  with its inputs and outputs bound by address.
- `cast_model` widens float16 to float32: y = Cast(x). Passage KV blocks are kept in float16 and
  read into a float32 cache; onnxruntime's vectorized cast is several times faster than numpy's.

The runtime does not depend on the `onnx` package, so the few ModelProto fields are written out
here; tests check them with onnx's own checker.
"""
from __future__ import annotations

import numpy as np

ELEMENT_TYPES = {"float32": 1, "float16": 10}      # onnx.TensorProto.DataType
INT64 = 7
ATTRIBUTE_INT = 2                                   # onnx.AttributeProto.AttributeType
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


def _node(op: str, inputs: tuple[str, ...], output: str, attribute: bytes = b"") -> bytes:
    return b"".join(_str(1, i) for i in inputs) + _str(2, output) + _str(4, op) + attribute


def _int_attribute(name: str, value: int) -> bytes:
    """NodeProto.attribute: an AttributeProto of type INT."""
    return _bytes(5, _str(1, name) + _int(3, value) + _int(20, ATTRIBUTE_INT))


def _model(graph: bytes) -> bytes:
    return _int(1, IR_VERSION) + _bytes(7, graph) + _bytes(8, _int(2, OPSET))


def slot_copy_model(dtype: np.dtype) -> bytes:
    """Serialized ModelProto for a cache of this float type."""
    element = ELEMENT_TYPES[np.dtype(dtype).name]
    graph = (_bytes(1, _node("Slice", INPUTS[:4], "part")) + _bytes(1, _node("Pad", ("part", "pads"), "y"))
             + _str(2, "slot_copy")
             + _bytes(11, _value("x", element, SLOT))
             + b"".join(_bytes(11, _value(name, INT64, (1,))) for name in INPUTS[1:4])
             + _bytes(11, _value("pads", INT64, (8,)))
             + _bytes(12, _value("y", element, SLOT)))
    return _model(graph)


def cast_model() -> bytes:
    """Serialized ModelProto: float16 x of any shape to float32 y."""
    dims = ("d0", "d1", "d2", "d3")
    to = ELEMENT_TYPES["float32"]
    graph = (_bytes(1, _node("Cast", ("x",), "y", _int_attribute("to", to))) + _str(2, "cast")
             + _bytes(11, _value("x", ELEMENT_TYPES["float16"], dims)) + _bytes(12, _value("y", to, dims)))
    return _model(graph)
