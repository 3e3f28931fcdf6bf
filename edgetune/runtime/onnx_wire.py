"""Just enough protobuf wire format to append the trained head to the frozen ONNX graph.

The runtime may not import the onnx package, and the edit is small: the ModelProto's GraphProto
gets new NodeProtos (Gemm/Relu/Flatten), TensorProto initializers for the head's weights and a new
graph output; every other field is copied byte for byte. Protobuf parsers merge repeated fields
in any order, so appending fields to a message is a valid edit.

Field numbers are from onnx/onnx.proto (stable since IR version 3).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

# ModelProto.graph; GraphProto.{node, initializer, output}; NodeProto.{input, output, name, op_type, attribute}
MODEL_GRAPH = 7
GRAPH_NODE, GRAPH_INITIALIZER, GRAPH_OUTPUT = 1, 5, 12
VARINT, LEN = 0, 2
FLOAT, ATTR_INT = 1, 2  # TensorProto.DataType.FLOAT, AttributeProto.AttributeType.INT


class WireError(ValueError):
    """The bytes are not the protobuf message expected."""


def _varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64  # int64 negatives are 10-byte two's complement varints
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise WireError("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return result, pos


def varints(payload: bytes | memoryview) -> Iterator[int]:
    """The values of a packed repeated varint field (int32/int64 lists), as unsigned 64-bit ints."""
    view = memoryview(payload)
    pos = 0
    while pos < len(view):
        value, pos = _read_varint(view, pos)
        yield value


def fields(buf: bytes | memoryview) -> Iterator[tuple[int, int, Any, memoryview]]:
    """Top-level fields of a message: (number, wire type, value, the field's raw bytes).

    The value is an int for varint/fixed fields and a memoryview of the payload for length-delimited
    ones; raw bytes let a writer copy untouched fields exactly.
    """
    view = memoryview(buf)
    pos = 0
    while pos < len(view):
        start = pos
        key, pos = _read_varint(view, pos)
        number, wire = key >> 3, key & 7
        if wire == VARINT:
            value, pos = _read_varint(view, pos)
        elif wire == LEN:
            size, pos = _read_varint(view, pos)
            if pos + size > len(view):
                raise WireError(f"field {number} runs past the end of the message")
            value, pos = view[pos:pos + size], pos + size
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            if pos + width > len(view):
                raise WireError(f"field {number} runs past the end of the message")
            value, pos = int.from_bytes(view[pos:pos + width], "little"), pos + width
        else:
            raise WireError(f"unsupported wire type {wire} (field {number})")
        yield number, wire, value, view[start:pos]


def _len_field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | LEN) + _varint(len(payload)) + payload


def _int_field(number: int, value: int) -> bytes:
    return _varint(number << 3 | VARINT) + _varint(value)


def _string(number: int, text: str) -> bytes:
    return _len_field(number, text.encode("utf-8"))


def tensor_proto(name: str, array: np.ndarray) -> bytes:
    """A float32 TensorProto (dims, data_type, name, raw_data little-endian)."""
    array = np.ascontiguousarray(array, dtype="<f4")
    dims = b"".join(_int_field(1, d) for d in array.shape)
    return dims + _int_field(2, FLOAT) + _string(8, name) + _len_field(9, array.tobytes())


def node_proto(op_type: str, inputs: Sequence[str], outputs: Sequence[str], name: str,
               int_attrs: Mapping[str, int] | None = None) -> bytes:
    """A NodeProto of the default domain with integer attributes only."""
    out = b"".join(_string(1, i) for i in inputs) + b"".join(_string(2, o) for o in outputs)
    out += _string(3, name) + _string(4, op_type)
    for key, value in (int_attrs or {}).items():
        out += _len_field(5, _string(1, key) + _int_field(3, value) + _int_field(20, ATTR_INT))
    return out


def value_info(name: str, dims: Sequence[int | str]) -> bytes:
    """A float tensor ValueInfoProto; str dims are symbolic (dim_param), ints fixed (dim_value)."""
    shape = b"".join(_len_field(1, _string(2, d) if isinstance(d, str) else _int_field(1, d)) for d in dims)
    tensor_type = _int_field(1, FLOAT) + _len_field(2, shape)
    return _string(1, name) + _len_field(2, _len_field(1, tensor_type))


def _name_of(value_info_bytes: memoryview) -> str:
    for number, wire, value, _ in fields(value_info_bytes):
        if number == 1 and wire == LEN:
            return bytes(value).decode("utf-8")
    return ""


def append_head(model: bytes, features: str, head: Sequence[Mapping[str, Any]],
                params: Mapping[str, np.ndarray], output: str = "logits") -> bytes:
    """The frozen ModelProto with the head appended: its only output becomes `output` (N, classes).

    Args:
        model: serialized ModelProto of the frozen part.
        features: the frozen graph's output name the head reads.
        head: the model's `meta["head"]` ops; dropout and identity are dropped (inference).
        params: trainable tensors by name (dense weights (out, in)).
        output: the name of the new graph output.

    Raises:
        WireError: the model bytes have no graph or the graph lacks the `features` output.
    """
    model_fields = list(fields(model))
    graphs = [f for f in model_fields if f[0] == MODEL_GRAPH and f[1] == LEN]
    if len(graphs) != 1:
        raise WireError(f"expected one graph in the model, found {len(graphs)}")
    graph_fields = list(fields(graphs[0][2]))
    outputs = [_name_of(v) for n, w, v, _ in graph_fields if n == GRAPH_OUTPUT and w == LEN]
    if features not in outputs:
        raise WireError(f"the frozen graph has no output {features!r} (outputs: {outputs})")
    additions: list[bytes] = []
    current, width = features, None
    ops = [op for op in head if op["op"] not in ("dropout", "identity")]
    if not any(op["op"] == "dense" for op in ops):
        raise WireError("the head has no dense layer, so the number of classes is unknown")
    for i, op in enumerate(ops):
        name = output if i == len(ops) - 1 else f"edgetune_head/{i}"
        if op["op"] == "dense":
            w = params[op["weight"]]
            width = w.shape[0]
            inputs = [current, f"edgetune_head/{op['weight']}"]
            additions.append(_len_field(GRAPH_INITIALIZER, tensor_proto(inputs[1], w)))
            if op.get("bias") is not None:
                inputs.append(f"edgetune_head/{op['bias']}")
                additions.append(_len_field(GRAPH_INITIALIZER, tensor_proto(inputs[2], params[op["bias"]])))
            additions.append(_len_field(GRAPH_NODE, node_proto("Gemm", inputs, [name], name, {"transB": 1})))
        elif op["op"] in ("relu", "flatten"):
            op_type, attrs = ("Relu", None) if op["op"] == "relu" else ("Flatten", {"axis": 1})
            additions.append(_len_field(GRAPH_NODE, node_proto(op_type, [current], [name], name, attrs)))
        else:
            raise WireError(f"cannot export head op {op['op']!r}")
        current = name
    additions.append(_len_field(GRAPH_OUTPUT, value_info(output, ["N", width])))
    graph = b"".join(bytes(raw) for n, _, _, raw in graph_fields if n != GRAPH_OUTPUT) + b"".join(additions)
    return b"".join(_len_field(MODEL_GRAPH, graph) if n == MODEL_GRAPH else bytes(raw) for n, _, _, raw in model_fields)
