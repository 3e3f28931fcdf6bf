"""Just enough protobuf wire format to append the trained module to the frozen ONNX graph.

The runtime may not import the onnx package, and the edit is small: the ModelProto's GraphProto
gets one NodeProto per module node (its op type and attributes, as the op registry names them),
TensorProto initializers for the parameters and constants, and a new graph output; every other
field is copied byte for byte. Protobuf parsers merge repeated fields in any order, so appending
fields to a message is a valid edit.

Field numbers are from onnx/onnx.proto (stable since IR version 3).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from edgetune.runtime.module import Module
from edgetune.runtime.ops import get_op

# ModelProto.graph; GraphProto.{node, initializer, output}; NodeProto.{input, output, name, op_type, attribute}
MODEL_GRAPH = 7
GRAPH_NODE, GRAPH_INITIALIZER, GRAPH_OUTPUT = 1, 5, 12
VARINT, LEN, FIXED32 = 0, 2, 5
FLOAT = 1  # TensorProto.DataType.FLOAT
DATA_TYPES = {np.dtype("<f4"): FLOAT, np.dtype("<i8"): 7, np.dtype("<f8"): 11}  # TensorProto.DataType
ATTR_FLOAT, ATTR_INT, ATTR_FLOATS, ATTR_INTS = 1, 2, 6, 7  # AttributeProto.AttributeType
PREFIX = "edgetune_head/"  # the module's tensors in the exported graph: never a name of the frozen part


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
    """A TensorProto (dims, data_type, name, raw_data little-endian) of a float32, int64 or float64 array."""
    array = np.asarray(array)
    array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    if array.dtype not in DATA_TYPES:
        raise WireError(f"cannot write a {array.dtype} tensor ({name})")
    dims = b"".join(_int_field(1, d) for d in array.shape)
    return dims + _int_field(2, DATA_TYPES[array.dtype]) + _string(8, name) + _len_field(9, array.tobytes())


def attribute_proto(key: str, value: Any) -> bytes:
    """An AttributeProto of an int, a float or a list of either (what the registered ops take)."""
    if isinstance(value, int):
        return _string(1, key) + _int_field(3, int(value)) + _int_field(20, ATTR_INT)
    if isinstance(value, float):
        return _string(1, key) + _fixed32(2, value) + _int_field(20, ATTR_FLOAT)
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value):
        return _string(1, key) + b"".join(_int_field(8, int(v)) for v in value) + _int_field(20, ATTR_INTS)
    if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value):
        return _string(1, key) + b"".join(_fixed32(7, float(v)) for v in value) + _int_field(20, ATTR_FLOATS)
    raise WireError(f"cannot write attribute {key}={value!r}")


def _fixed32(number: int, value: float) -> bytes:
    return _varint(number << 3 | FIXED32) + np.float32(value).astype("<f4").tobytes()


def node_proto(op_type: str, inputs: Sequence[str], outputs: Sequence[str], name: str,
               attributes: Mapping[str, Any] | None = None) -> bytes:
    """A NodeProto of the default domain."""
    out = b"".join(_string(1, i) for i in inputs) + b"".join(_string(2, o) for o in outputs)
    out += _string(3, name) + _string(4, op_type)
    for key, value in (attributes or {}).items():
        out += _len_field(5, attribute_proto(key, value))
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


def append_module(model: bytes, module: Module, num_classes: int, output: str = "logits") -> bytes:
    """The frozen ModelProto with the trained module appended: its only output becomes `output` (N, classes).

    Each node is written as its op type with the attributes that differ from the op's defaults;
    nodes that are the identity at inference (dropout, identity) are left out, and a BatchNorm that
    trains with batch statistics normalises with its running statistics (no `training_mode`).
    Parameters and constants become initializers; the module's tensors are renamed under `PREFIX`,
    except its input, the frozen graph's output.

    Args:
        model: serialized ModelProto of the frozen part.
        module: the trained module; its input must be an output of the frozen graph.
        num_classes: the width of `output`.
        output: the name of the new graph output.

    Raises:
        WireError: the model bytes have no graph or the graph lacks the module's input as an output.
    """
    model_fields = list(fields(model))
    graphs = [f for f in model_fields if f[0] == MODEL_GRAPH and f[1] == LEN]
    if len(graphs) != 1:
        raise WireError(f"expected one graph in the model, found {len(graphs)}")
    graph_fields = list(fields(graphs[0][2]))
    outputs = [_name_of(v) for n, w, v, _ in graph_fields if n == GRAPH_OUTPUT and w == LEN]
    if module.input not in outputs:
        raise WireError(f"the frozen graph has no output {module.input!r} (outputs: {outputs})")
    renamed = {module.input: module.input, module.output: output}

    def name(tensor: str) -> str:
        return "" if not tensor else renamed.setdefault(tensor, PREFIX + tensor)

    nodes: list[bytes] = []
    read: set[str] = set()
    for node in module.nodes:
        op = get_op(node.op_type)
        if op.identity_at_inference:  # its output is its first input
            renamed[node.outputs[0]] = name(node.inputs[0])
            continue
        changed = {k: v for k, v in node.attributes.items() if op.attributes.get(k) != v}
        changed.pop("training_mode", None)  # inference: BatchNorm normalises with its running statistics
        read.update(node.inputs)
        out = name(node.outputs[0])
        nodes.append(_len_field(GRAPH_NODE, node_proto(node.op_type, [name(i) for i in node.inputs], [out],
                                                       PREFIX + (node.name or out), changed)))
    tensors = {**{n: p.data for n, p in module.params.items()}, **module.constants}
    additions = [_len_field(GRAPH_INITIALIZER, tensor_proto(name(t), v)) for t, v in tensors.items() if t in read]
    additions += nodes
    if renamed[module.output] != output:  # the module ends in a left-out node: name its input `output`
        additions.append(_len_field(GRAPH_NODE, node_proto("Identity", [renamed[module.output]], [output],
                                                           PREFIX + output)))
    additions.append(_len_field(GRAPH_OUTPUT, value_info(output, ["N", num_classes])))
    graph = b"".join(bytes(raw) for n, _, _, raw in graph_fields if n != GRAPH_OUTPUT) + b"".join(additions)
    return b"".join(_len_field(MODEL_GRAPH, graph) if n == MODEL_GRAPH else bytes(raw) for n, _, _, raw in model_fields)
