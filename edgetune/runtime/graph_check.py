"""The frozen graph is data: check an ONNX model's bytes before onnxruntime sees them (no onnx import).

A `.tod` from someone else carries its frozen graph as a blob that onnxruntime loads and runs, and
ONNX can hide more than arithmetic in one. This module reads the protobuf wire format
(`edgetune.runtime.onnx_wire`; field numbers from onnx/onnx.proto) and refuses, with one message
naming the tensor or node:

- **external data**: a tensor whose bytes live in a file (`data_location = EXTERNAL` or
  `external_data` entries) in an initializer, a Constant's attribute or a subgraph. onnxruntime
  would resolve `.ssh/id_rsa` against the working directory and that file's bytes would flow into
  the features, the `-v` output and the feature cache.
- **code and control flow**: model-local functions, subgraphs (the bodies of If/Loop/Scan), op
  domains other than the standard one (contrib and custom ops), training info, a model that asks
  onnxruntime to configure its own session (`ort_config` metadata), and, in a frozen graph, any op
  outside `FROZEN_OPS`.
- **size bombs**: a declared tensor (initializer, Constant value, value_info dim, the constant
  target of a Reshape/Expand/ConstantOfShape/Tile) or, in a frozen graph, any tensor whose size
  follows from the input image, over `tensor_limit(chw)` elements (per image).

`scan_model` makes the first two kinds of check and the declared-size one on any ONNX model:
`edgetune convert` runs it on its input before onnxscript or onnxruntime fold anything.
`check_frozen_graph` adds the op allow-list and a shape inference over it, and estimates the memory
onnxruntime will need; the converter runs it on what it writes and the session on what it loads.
Unknown fields are refused too: a newer onnxruntime might give them a meaning.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgetune.runtime.bounds import require_memory
from edgetune.runtime.onnx_wire import LEN, VARINT, WireError, fields, varints

BATCH = "N"                      # the dynamic batch dimension in inferred shapes
MAX_OPSET = 18                   # the frozen graphs we export (docs/FORMAT.md); newer ops are not vetted
ACTIVATION_FACTOR = 64           # per image, no tensor may exceed 64x the input image ...
MIN_TENSOR_ELEMENTS = 1 << 22    # ... or 4 Mi elements, whichever is larger (Lite0: 9.6 Mi; its largest is 1.3 Mi)
MAX_RANK = 16
MAX_DEPTH = 8                    # subgraph nesting walked (to report external data inside) before refusing
MAX_NAME_BYTES = 4096
STANDARD_DOMAINS = ("", "ai.onnx")

# TensorProto.DataType -> bytes per element: FLOAT UINT8 INT8 UINT16 INT16 INT32 INT64 BOOL FLOAT16
# DOUBLE UINT32 UINT64 BFLOAT16. Strings, complex and sub-byte types are refused.
ITEMSIZE = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2}
INT_DTYPES = {6: "<i4", 7: "<i8"}  # integer tensors whose values shape arithmetic may need
FLOAT = 1


class UnsafeGraph(ValueError):
    """The graph is refused: it is not code-free data of bounded size (the message says what and where)."""


class Message:
    """The fields a message may have (onnx/onnx.proto numbers) with their wire kinds; the rest is refused.

    Kinds: `len` (a string, bytes or sub-message), `varint`, `fixed32`, and `list` (a repeated
    number, packed or not). A field of the wrong wire type is refused like an unknown one: a
    newer onnxruntime might give either a meaning.
    """

    WIRES = {"len": (LEN,), "varint": (VARINT,), "fixed32": (5,), "list": (VARINT, LEN, 1, 5)}

    def __init__(self, what: str, refused: dict[int, str], **spec: tuple[int, str]) -> None:
        self.what, self.refused = what, refused
        self.numbers = {name: number for name, (number, _) in spec.items()}
        self.wires = {number: self.WIRES[kind] for number, kind in spec.values()}

    def __getitem__(self, name: str) -> int:
        return self.numbers[name]

    def read(self, view: memoryview) -> Iterator[tuple[int, int, Any, memoryview]]:
        """`fields(view)`, refusing the numbers in `refused` (with their reason) and any unknown field."""
        for item in fields(view):
            number, wire = item[0], item[1]
            if number in self.refused:
                raise UnsafeGraph(f"{self.what} holds {self.refused[number]}: not allowed")
            if wire not in self.wires.get(number, ()):
                raise UnsafeGraph(f"{self.what} has an unknown field {number} (wire type {wire})")
            yield item


S, V = "len", "varint"
MODEL = Message("the model", {20: "training info (extra graphs)", 25: "model-local functions",
                              26: "device configurations"},
                ir_version=(1, V), producer_name=(2, S), producer_version=(3, S), domain=(4, S),
                model_version=(5, V), doc_string=(6, S), graph=(7, S), opset_import=(8, S), metadata_props=(14, S))
GRAPH = Message("a graph", {14: "quantization annotations", 15: "sparse initializers"},
                node=(1, S), name=(2, S), initializer=(5, S), doc_string=(10, S), input=(11, S), output=(12, S),
                value_info=(13, S), metadata_props=(16, S))
NODE = Message("a node", {8: "a function overload", 10: "device configurations"},
               input=(1, S), output=(2, S), name=(3, S), op_type=(4, S), attribute=(5, S), doc_string=(6, S),
               domain=(7, S), metadata_props=(9, S))
ATTR = Message("an attribute", {14: "a type proto", 15: "type protos", 21: "a reference to a function attribute",
                                22: "a sparse tensor", 23: "sparse tensors"},
               name=(1, S), f=(2, "fixed32"), i=(3, V), s=(4, S), t=(5, S), g=(6, S), floats=(7, "list"),
               ints=(8, "list"), strings=(9, S), tensors=(10, S), graphs=(11, S), doc_string=(13, S), type=(20, V))
TENSOR = Message("a tensor", {3: "a segment of a larger tensor", 6: "string data"},
                 dims=(1, "list"), data_type=(2, V), float_data=(4, "list"), int32_data=(5, "list"),
                 int64_data=(7, "list"), name=(8, S), raw_data=(9, S), double_data=(10, "list"),
                 uint64_data=(11, "list"), doc_string=(12, S), external_data=(13, S), data_location=(14, V),
                 metadata_props=(16, S))
EXTERNAL = 1  # TensorProto.DataLocation

# Ops whose output size is one of their inputs' values: that input, when constant, is bounded.
SIZE_TARGETS = {"Reshape": 1, "Expand": 1, "ConstantOfShape": 0, "Tile": 1}


def tensor_limit(chw: Sequence[int]) -> int:
    """The most elements one tensor of a graph taking `chw` images may have (per image for activations).

    `ACTIVATION_FACTOR` times the input image, at least `MIN_TENSOR_ELEMENTS`. Lite0 at 3x224x224:
    9.6 Mi elements; its largest weight has 1.3 Mi, its largest activation 1.2 Mi per image.
    """
    return max(MIN_TENSOR_ELEMENTS, ACTIVATION_FACTOR * math.prod(int(d) for d in chw))


# --- parsing the wire format into small records -----------------------------------------------


@dataclass
class Tensor:
    """A TensorProto's header: name, dims, type, and its values when it is a short integer vector."""

    name: str
    dims: tuple[int, ...]
    dtype: int
    ints: tuple[int, ...] | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.dims) * ITEMSIZE[self.dtype]


@dataclass
class Node:
    """A NodeProto: op, domain, name, wiring and decoded attributes (ints, floats, bytes, `Tensor`s)."""

    op_type: str
    domain: str
    name: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any]

    def __str__(self) -> str:
        return f"node {self.name or (self.outputs[:1] or ['?'])[0]!r} ({self.op_type})"


@dataclass
class Graph:
    """A GraphProto: nodes in file order, initializer headers, and the declared inputs and outputs."""

    nodes: list[Node] = field(default_factory=list)
    initializers: list[Tensor] = field(default_factory=list)
    inputs: dict[str, tuple[int, list[int | str | None]]] = field(default_factory=dict)   # name -> (elem type, dims)
    outputs: dict[str, tuple[int, list[int | str | None]]] = field(default_factory=dict)


@dataclass
class Model:
    """A ModelProto: its one graph and the version of the standard opset it imports."""

    graph: Graph
    opsets: dict[str, int]


def scan_model(blob: bytes, chw: Sequence[int]) -> None:
    """Refuse an ONNX model that is not code-free data of bounded declared size (any graph).

    Args:
        blob: a serialized ModelProto.
        chw: the image size it takes; sets the size limit (`tensor_limit`).

    Raises:
        UnsafeGraph: external data, functions, subgraphs, non-standard domains, an `ort_config`,
            unknown fields, a declared size over the limit, or bytes that are not a ModelProto.
    """
    _parse(blob, tensor_limit(chw))


def _parse(blob: bytes, limit: int) -> Model:
    try:
        return _model(memoryview(blob), limit)
    except WireError as e:
        raise UnsafeGraph(f"the frozen graph is not a valid ONNX model ({e})") from None


def _model(view: memoryview, limit: int) -> Model:
    graphs: list[Graph] = []
    opsets: dict[str, int] = {}
    for number, wire, value, _ in MODEL.read(view):
        if number == MODEL["graph"]:
            graphs.append(_graph(value, limit, 0))
        elif number == MODEL["opset_import"]:
            domain, version = "", 0
            for n, w, v, _ in fields(value):
                if n == 1 and w == LEN:
                    domain = _text(v)
                elif n == 2 and w == VARINT:
                    version = _signed(v)
            if domain not in STANDARD_DOMAINS:
                raise UnsafeGraph(f"the model imports op domain {domain!r}: only the standard ONNX domain is "
                                  f"allowed (no contrib or custom ops)")
            opsets[""] = version
        elif number == MODEL["metadata_props"]:
            key = next((_text(v) for n, w, v, _ in fields(value) if n == 1 and w == LEN), "")
            if key == "ort_config":
                raise UnsafeGraph("the model carries an 'ort_config' entry (onnxruntime session settings): "
                                  "a model may not configure the runtime")
    if len(graphs) != 1:
        raise UnsafeGraph(f"expected one graph in the model, found {len(graphs)}")
    graph = graphs[0]
    _check_size_targets(graph, limit)
    return Model(graph, opsets)


def _graph(view: memoryview, limit: int, depth: int) -> Graph:
    if depth > MAX_DEPTH:
        raise UnsafeGraph(f"subgraphs nested more than {MAX_DEPTH} deep")
    graph = Graph()
    for number, wire, value, _ in GRAPH.read(view):
        if number == GRAPH["node"]:
            graph.nodes.append(_node(value, limit, depth))
        elif number == GRAPH["initializer"]:
            graph.initializers.append(_tensor(value, "initializer", limit))
        elif number in (GRAPH["input"], GRAPH["output"], GRAPH["value_info"]):
            name, declared = _value_info(value, limit)
            if number == GRAPH["input"]:
                graph.inputs[name] = declared
            elif number == GRAPH["output"]:
                graph.outputs[name] = declared
    return graph


def _node(view: memoryview, limit: int, depth: int) -> Node:
    node = Node("", "", "", [], [], {})
    raw_attrs = []
    for number, _, value, _ in NODE.read(view):
        if number == NODE["input"]:
            node.inputs.append(_text(value))
        elif number == NODE["output"]:
            node.outputs.append(_text(value))
        elif number == NODE["name"]:
            node.name = _text(value)
        elif number == NODE["op_type"]:
            node.op_type = _text(value)
        elif number == NODE["domain"]:
            node.domain = _text(value)
        elif number == NODE["attribute"]:
            raw_attrs.append(value)
    if node.domain not in STANDARD_DOMAINS:
        raise UnsafeGraph(f"{node}: op domain {node.domain!r} is not allowed (no contrib or custom ops)")
    for raw in raw_attrs:  # after the node's name is known, so every message can name it
        try:
            name, value = _attribute(raw, limit, depth)
        except UnsafeGraph as e:
            raise UnsafeGraph(f"{node}: {e}") from None
        node.attrs[name] = value
    return node


def _attribute(view: memoryview, limit: int, depth: int) -> tuple[str, Any]:
    name, kind = "", 0
    values: dict[str, Any] = {}
    subgraph = False
    for number, wire, value, _ in ATTR.read(view):
        if number == ATTR["name"]:
            name = _text(value)
        elif number == ATTR["type"]:
            kind = value
        elif number == ATTR["f"]:
            values["f"] = struct.unpack("<f", value.to_bytes(4, "little"))[0]
        elif number == ATTR["i"]:
            values["i"] = _signed(value)
        elif number == ATTR["s"]:
            values["s"] = bytes(value)
        elif number == ATTR["t"]:
            values["t"] = _tensor(value, f"attribute {name or '?'}", limit)
        elif number in (ATTR["g"], ATTR["graphs"]):
            _graph(value, limit, depth + 1)  # walked first: external data inside gets its own message
            subgraph = True
        elif number == ATTR["floats"]:
            values.setdefault("floats", []).extend(_floats(wire, value))
        elif number == ATTR["ints"]:
            values.setdefault("ints", []).extend(_ints(wire, value))
        elif number == ATTR["strings"]:
            values.setdefault("strings", []).append(bytes(value))
        elif number == ATTR["tensors"]:
            values.setdefault("tensors", []).append(_tensor(value, f"attribute {name or '?'}", limit))
    if subgraph:
        raise UnsafeGraph(f"attribute {name!r} holds a subgraph: control flow (If, Loop, Scan) is not allowed")
    for key in ("floats", "ints", "strings", "tensors"):
        if len(values.get(key, ())) > limit:
            raise UnsafeGraph(f"attribute {name!r} lists {len(values[key])} values, over the limit of {limit}")
    # AttributeProto.type says which field is the value; without it, the one field present
    by_type = {1: "f", 2: "i", 3: "s", 4: "t", 6: "floats", 7: "ints", 8: "strings", 9: "tensors"}
    key = by_type.get(kind) or (next(iter(values)) if len(values) == 1 else None)
    value = values.get(key) if key else None
    return name, tuple(value) if isinstance(value, list) else value


def _tensor(view: memoryview, where: str, limit: int) -> Tensor:
    dims: list[int] = []
    dtype, name, raw, typed = 0, "", None, 0
    int_values: list[int] = []
    location: str | None = None
    for number, wire, value, _ in TENSOR.read(view):
        if number == TENSOR["dims"]:
            dims.extend(_ints(wire, value))
        elif number == TENSOR["data_type"]:
            dtype = value
        elif number == TENSOR["name"]:
            name = _text(value)
        elif number == TENSOR["raw_data"]:
            raw = value
        elif number in (TENSOR["float_data"], TENSOR["double_data"]):
            width = 4 if number == TENSOR["float_data"] else 8
            typed += len(value) // width if wire == LEN else 1
        elif number in (TENSOR["int32_data"], TENSOR["int64_data"], TENSOR["uint64_data"]):
            ints = _ints(wire, value)
            typed += len(ints)
            if len(int_values) <= MAX_RANK:
                int_values.extend(ints)
        elif number == TENSOR["external_data"]:
            entry = {n: _text(v) for n, w, v, _ in fields(value) if w == LEN}
            location = entry.get(2, "?") if entry.get(1) == "location" else (location or "?")
        elif number == TENSOR["data_location"] and value == EXTERNAL:
            location = location or "?"
    what = f"{where} {name!r}"
    if location is not None:
        raise UnsafeGraph(f"{what} keeps its data in an external file ({location!r}): a model must carry "
                          f"its own bytes, external data is not read")
    if dtype not in ITEMSIZE:
        raise UnsafeGraph(f"{what} has data type {dtype}: only numeric tensors are allowed")
    if len(dims) > MAX_RANK or any(d < 0 for d in dims):
        raise UnsafeGraph(f"{what} has bad dims {dims[:MAX_RANK + 1]}")
    count = math.prod(dims)
    if count > limit:
        raise UnsafeGraph(f"{what} declares {count} elements, over the limit of {limit}")
    present = typed
    if raw is not None:
        if len(raw) % ITEMSIZE[dtype]:
            raise UnsafeGraph(f"{what}: {len(raw)} bytes of data is not a whole number of elements")
        present = len(raw) // ITEMSIZE[dtype]
    if present != count:
        raise UnsafeGraph(f"{what} declares dims {dims} ({count} elements) but holds {present}")
    tensor = Tensor(name, tuple(dims), dtype)
    if dtype in INT_DTYPES and count <= MAX_RANK:
        tensor.ints = (tuple(int(v) for v in np.frombuffer(raw, INT_DTYPES[dtype])) if raw is not None
                       else tuple(int_values[:count]))
    return tensor


def _value_info(view: memoryview, limit: int) -> tuple[str, tuple[int, list[int | str | None]]]:
    name, elem, dims = "", 0, []
    for number, wire, value, _ in fields(view):
        if number == 1 and wire == LEN:
            name = _text(value)
        elif number == 2 and wire == LEN:
            for n, w, v, _ in fields(value):  # TypeProto: only tensor_type (1) and denotation (6)
                if n == 1 and w == LEN:
                    elem, dims = _tensor_type(v)
                elif n != 6:
                    raise UnsafeGraph(f"value {name!r} is not a tensor (TypeProto field {n})")
        elif number not in (3, 4):  # doc_string, metadata_props
            raise UnsafeGraph(f"value {name!r} has an unknown field {number}")
    fixed = [d for d in dims if isinstance(d, int)]
    if any(d < 0 for d in fixed) or math.prod(fixed) > limit:
        raise UnsafeGraph(f"value {name!r} declares dims {dims[:MAX_RANK]}, over the limit of {limit} elements")
    return name, (elem, dims)


def _tensor_type(view: memoryview) -> tuple[int, list[int | str | None]]:
    elem, dims = 0, []
    for n, w, v, _ in fields(view):
        if n == 1 and w == VARINT:
            elem = v
        elif n == 2 and w == LEN:
            for dn, dw, dv, _ in fields(v):
                if dn == 1 and dw == LEN:
                    dim: int | str | None = None
                    for kn, kw, kv, _ in fields(dv):
                        if kn == 1 and kw == VARINT:
                            dim = _signed(kv)
                        elif kn == 2 and kw == LEN:
                            dim = _text(kv)
                    dims.append(dim)
                    if len(dims) > MAX_RANK:
                        raise UnsafeGraph(f"a declared shape has more than {MAX_RANK} dims")
    return elem, dims


def _text(value: Any) -> str:
    if not isinstance(value, memoryview) or len(value) > MAX_NAME_BYTES:
        raise UnsafeGraph("a name is malformed or longer than 4096 bytes")
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        raise UnsafeGraph("a name is not valid UTF-8") from None


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _ints(wire: int, value: Any) -> list[int]:
    if wire == VARINT:
        return [_signed(value)]
    if wire == LEN:
        return [_signed(v) for v in varints(value)]
    raise UnsafeGraph(f"an integer list has wire type {wire}")


def _floats(wire: int, value: Any) -> list[float]:
    if wire == 5:
        return [struct.unpack("<f", value.to_bytes(4, "little"))[0]]
    if wire == LEN and len(value) % 4 == 0:
        return list(struct.unpack(f"<{len(value) // 4}f", value))
    raise UnsafeGraph(f"a float list has wire type {wire}")


def _check_size_targets(graph: Graph, limit: int) -> None:
    """Constant shape inputs of Reshape/Expand/ConstantOfShape/Tile: at most `limit` elements."""
    consts = {t.name: t.ints for t in graph.initializers if t.ints is not None}
    for node in graph.nodes:
        if node.op_type == "Constant" and node.outputs:
            value = node.attrs.get("value")
            consts[node.outputs[0]] = value.ints if isinstance(value, Tensor) else node.attrs.get("value_ints")
    for node in graph.nodes:
        index = SIZE_TARGETS.get(node.op_type)
        if index is None or len(node.inputs) <= index or consts.get(node.inputs[index]) is None:
            continue
        target = consts[node.inputs[index]]
        size = math.prod(d for d in target if d > 0)
        if size > limit:
            raise UnsafeGraph(f"{node}: its constant target {list(target)} makes {size} elements, "
                              f"over the limit of {limit}")


# --- the frozen graph: op allow-list and shape inference -------------------------------------


@dataclass(frozen=True)
class Value:
    """A tensor during shape inference: its shape (ints and BATCH) and, for shape vectors, its values."""

    shape: tuple[int | str, ...]
    ints: tuple[int | str, ...] | None = None


@dataclass(frozen=True)
class FrozenOp:
    """One allowed op of a frozen graph: its attributes, input count and shape rule."""

    op_type: str
    attributes: frozenset[str]
    inputs: tuple[int, int]
    infer: Callable[[Node, list[Value | None]], Value]


FROZEN_OPS: dict[str, FrozenOp] = {}


def frozen_op(op_type: str, attributes: Sequence[str] = (), inputs: tuple[int, int] = (1, 1)):
    """Decorator: enter a shape rule in `FROZEN_OPS` (each entry says which frozen graph uses it)."""

    def enter(infer: Callable[[Node, list[Value | None]], Value]) -> Callable[[Node, list[Value | None]], Value]:
        if op_type in FROZEN_OPS:
            raise ValueError(f"frozen op {op_type} registered twice")
        FROZEN_OPS[op_type] = FrozenOp(op_type, frozenset(attributes), inputs, infer)
        return infer

    return enter


def _bad(node: Node, why: str) -> UnsafeGraph:
    return UnsafeGraph(f"{node}: {why}")


def _fold(dims: Sequence[int | str], node: Node) -> int | str:
    """The product of `dims`, BATCH if one of them is BATCH and the rest multiply to 1."""
    ints = math.prod(d for d in dims if d != BATCH)
    batches = sum(d == BATCH for d in dims)
    if batches == 0:
        return ints
    if batches == 1 and ints == 1:
        return BATCH
    raise _bad(node, f"dims {list(dims)} would mix the images of a batch")


@frozen_op("Relu")          # tiny test graph
@frozen_op("Sigmoid")       # B0 (swish = x * sigmoid(x))
@frozen_op("Clip", inputs=(1, 3))  # Lite0 (ReLU6)
def _same_shape(node: Node, ins: list[Value | None]) -> Value:
    return Value(ins[0].shape)


@frozen_op("Add", inputs=(2, 2))    # Lite0, B0 (residuals)
@frozen_op("Mul", inputs=(2, 2))    # B0 (swish, squeeze-excite)
def _broadcast(node: Node, ins: list[Value | None]) -> Value:
    return Value(_broadcast_shapes(node, ins[0].shape, ins[1].shape))


def _broadcast_shapes(node: Node, a: tuple, b: tuple) -> tuple:
    rank = max(len(a), len(b))
    a, b = (1,) * (rank - len(a)) + tuple(a), (1,) * (rank - len(b)) + tuple(b)
    out = []
    for x, y in zip(a, b):
        if x != y and 1 not in (x, y):
            raise _bad(node, f"shapes {list(a)} and {list(b)} do not broadcast for every batch size")
        out.append(y if x == 1 else x)
    return tuple(out)


@frozen_op("Conv", ("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides"), (2, 3))  # all
def _conv(node: Node, ins: list[Value | None]) -> Value:
    x, w = ins[0].shape, ins[1].shape
    k = len(x) - 2
    if k < 1 or len(w) != len(x) or any(not isinstance(d, int) for d in (*x[1:], *w)):
        raise _bad(node, f"input {list(x)} and weight {list(w)} are not a convolution")
    a = node.attrs
    group = a.get("group", 1)
    kernel = tuple(a.get("kernel_shape", w[2:]))
    strides, dilations = tuple(a.get("strides", (1,) * k)), tuple(a.get("dilations", (1,) * k))
    pads = tuple(a.get("pads", (0,) * 2 * k))
    if (not isinstance(group, int) or group < 1 or x[1] != w[1] * group or w[0] % group or kernel != w[2:]
            or len(strides) != k or len(dilations) != k or len(pads) != 2 * k
            or min(strides) < 1 or min(dilations) < 1 or min(pads) < 0):
        raise _bad(node, f"bad attributes for input {list(x)} and weight {list(w)}")
    mode = a.get("auto_pad", b"NOTSET")
    out = []
    for i in range(k):
        span = (kernel[i] - 1) * dilations[i] + 1
        if mode in (b"SAME_UPPER", b"SAME_LOWER"):
            n = -(-x[2 + i] // strides[i])
        elif mode == b"VALID":
            n = (x[2 + i] - span) // strides[i] + 1
        elif mode == b"NOTSET":
            n = (x[2 + i] + pads[i] + pads[i + k] - span) // strides[i] + 1
        else:
            raise _bad(node, f"unknown auto_pad {mode!r}")
        if n < 1:
            raise _bad(node, f"gives an empty output for input {list(x)}")
        out.append(n)
    if len(ins) > 2 and ins[2] is not None and ins[2].shape != (w[0],):
        raise _bad(node, f"bias {list(ins[2].shape)} is not ({w[0]},)")
    return Value((x[0], w[0], *out))


@frozen_op("ReduceMean", ("axes", "keepdims", "noop_with_empty_axes"), (1, 2))  # Lite0, B0 (pooling)
def _reduce_mean(node: Node, ins: list[Value | None]) -> Value:
    x = ins[0].shape
    if len(ins) > 1 and ins[1] is not None:
        if ins[1].ints is None:
            raise _bad(node, "its axes are not a constant")
        axes = ins[1].ints
    else:
        axes = node.attrs.get("axes", ())
    if not axes:
        if node.attrs.get("noop_with_empty_axes", 0):
            return Value(x)
        axes = range(len(x))
    if any(not isinstance(a, int) or not -len(x) <= a < len(x) for a in axes):
        raise _bad(node, f"axes {list(axes)} are out of range for {list(x)}")
    chosen = {a % len(x) for a in axes}
    if node.attrs.get("keepdims", 1):
        return Value(tuple(1 if i in chosen else d for i, d in enumerate(x)))
    return Value(tuple(d for i, d in enumerate(x) if i not in chosen))


@frozen_op("GlobalAveragePool")  # tiny test graph
def _global_pool(node: Node, ins: list[Value | None]) -> Value:
    x = ins[0].shape
    if len(x) < 3:
        raise _bad(node, f"input {list(x)} has no spatial dims")
    return Value((x[0], x[1], *(1,) * (len(x) - 2)))


@frozen_op("Flatten", ("axis",))  # tiny test graph
def _flatten(node: Node, ins: list[Value | None]) -> Value:
    x = ins[0].shape
    axis = node.attrs.get("axis", 1)
    if not isinstance(axis, int) or not -len(x) <= axis <= len(x):
        raise _bad(node, f"axis {axis} is out of range for {list(x)}")
    if axis < 0:
        axis += len(x)
    if BATCH in x[axis:]:
        raise _bad(node, "would mix the images of a batch")
    return Value((_fold(x[:axis], node), math.prod(x[axis:])))


@frozen_op("Shape", ("start", "end"))  # Lite0, B0 (the batch size for the final reshape)
def _shape(node: Node, ins: list[Value | None]) -> Value:
    x = ins[0].shape
    start, end = node.attrs.get("start", 0), node.attrs.get("end", len(x))
    if not isinstance(start, int) or not isinstance(end, int):
        raise _bad(node, f"start {start!r} and end {end!r} must be integers")
    dims = x[start:end]  # Python's slice clamps negative and out-of-range ends as ONNX's Shape does
    return Value((len(dims),), tuple(dims))


@frozen_op("Concat", ("axis",), (1, 1 << 20))  # Lite0, B0 (the reshape target [N, -1])
def _concat(node: Node, ins: list[Value | None]) -> Value:
    if any(v is None for v in ins):
        raise _bad(node, "has an empty input")
    first = ins[0].shape
    axis = node.attrs.get("axis")
    if not isinstance(axis, int) or not -len(first) <= axis < len(first):
        raise _bad(node, f"axis {axis} is out of range for {list(first)}")
    axis %= len(first)
    for v in ins:
        if len(v.shape) != len(first) or any(a != b for i, (a, b) in enumerate(zip(v.shape, first)) if i != axis):
            raise _bad(node, f"inputs {[list(v.shape) for v in ins]} do not concatenate on axis {axis}")
    along = [v.shape[axis] for v in ins]
    total = along[0] if len(along) == 1 else sum(along) if BATCH not in along else None
    if total is None:
        raise _bad(node, "concatenates along the batch dimension")
    ints = None
    if len(first) == 1 and all(v.ints is not None for v in ins):
        ints = tuple(d for v in ins for d in v.ints)
    return Value((*first[:axis], total, *first[axis + 1:]), ints)


@frozen_op("Reshape", ("allowzero",), (2, 2))  # Lite0, B0 (flatten the pooled features)
def _reshape(node: Node, ins: list[Value | None]) -> Value:
    x, target = ins[0].shape, ins[1].ints
    if target is None:
        raise _bad(node, "its target shape is neither a constant nor taken from the input: its size cannot be bounded")
    out: list[int | str] = []
    for i, t in enumerate(target):
        if t == 0 and not node.attrs.get("allowzero", 0):
            if i >= len(x):
                raise _bad(node, f"target {list(target)} copies a dim the input {list(x)} does not have")
            t = x[i]
        out.append(t)
    if out.count(-1) > 1 or any(isinstance(d, int) and d < -1 for d in out):
        raise _bad(node, f"bad target {list(target)}")
    per_image = math.prod(d for d in x if d != BATCH)
    known = math.prod(d for d in out if d not in (-1, BATCH))
    batches_in, batches_out = x.count(BATCH), out.count(BATCH)
    if -1 in out:
        if known and batches_out == batches_in and per_image % known == 0:
            fill: int | str = per_image // known
        elif known and batches_in == 1 and batches_out == 0 and per_image == known:
            fill = BATCH
        else:
            raise _bad(node, f"cannot reshape {list(x)} to {list(target)} for every batch size")
        out[out.index(-1)] = fill
    elif batches_out != batches_in or known != per_image:
        raise _bad(node, f"cannot reshape {list(x)} to {list(target)} for every batch size")
    return Value(tuple(out))


@frozen_op("Gemm", ("alpha", "beta", "transA", "transB"), (2, 3))  # Lite0, B0 (the ImageNet classifier)
def _gemm(node: Node, ins: list[Value | None]) -> Value:
    a, b = ins[0].shape, ins[1].shape
    if len(a) != 2 or len(b) != 2:
        raise _bad(node, f"takes matrices, got {list(a)} and {list(b)}")
    m, k = (a[1], a[0]) if node.attrs.get("transA", 0) else a
    k2, n = (b[1], b[0]) if node.attrs.get("transB", 0) else b
    if k != k2 or BATCH in (k, n):
        raise _bad(node, f"cannot multiply {list(a)} by {list(b)}")
    if len(ins) > 2 and ins[2] is not None and _broadcast_shapes(node, (m, n), ins[2].shape) != (m, n):
        raise _bad(node, f"bias {list(ins[2].shape)} does not broadcast to {[m, n]}")
    return Value((m, n))


@dataclass(frozen=True)
class GraphReport:
    """What `check_frozen_graph` found: enough to budget memory before onnxruntime loads the graph.

    Attributes:
        ops: op type -> node count.
        weight_bytes: bytes of all initializers.
        peak_bytes: activations alive at once at the fullest point of the node order, per image
            (float32; each tensor lives from its node to its last reader).
        largest: the largest tensor per image: (name, elements).
        output: the inferred shape of the output.
    """

    ops: dict[str, int]
    weight_bytes: int
    peak_bytes: int
    largest: tuple[str, int]
    output: tuple[int | str, ...]

    def memory(self, images: int) -> int:
        """Bytes to load the graph and run `images` images at once, with a margin of 2 on each part.

        onnxruntime keeps the weights twice (its copy and the re-laid-out conv weights), and its
        arena rounds activations up (measured on Lite0, 4 images: +77 MB load, +49 MB run;
        this estimate: 2 x 18.7 MB + 2 x 4 x the peak).
        """
        return 2 * self.weight_bytes + 2 * images * self.peak_bytes


def check_frozen_graph(blob: bytes, io: tuple[str, str], chw: Sequence[int]) -> GraphReport:
    """Check a frozen graph: `scan_model`'s rules, standard ops from `FROZEN_OPS` only, every size bounded.

    The shapes of all tensors are inferred from the input image (C, H, W) with a symbolic batch,
    so a size that only shows when the graph runs (huge pads, a broadcast or a concat that
    multiplies) is refused here, not met as an out-of-memory kill.

    Args:
        blob: the serialized ModelProto.
        io: the names of its image input and feature output (the model's `meta.frozen`).
        chw: the image size (C, H, W) the model takes.

    Returns:
        The report (sizes for the memory budget).

    Raises:
        UnsafeGraph: what is refused, naming the node or tensor.
    """
    limit = tensor_limit(chw)
    model = _parse(blob, limit)
    version = model.opsets.get("", 0)
    if not 1 <= version <= MAX_OPSET:
        raise UnsafeGraph(f"the graph uses opset {version}: a frozen graph must use opset 1..{MAX_OPSET}")
    graph = model.graph
    name_in, name_out = io
    values: dict[str, Value] = {}
    for t in graph.initializers:
        if t.name in values:
            raise UnsafeGraph(f"initializer {t.name!r} is defined twice")
        values[t.name] = Value(t.dims, t.ints)
    extra = [n for n in graph.inputs if n != name_in and n not in values]
    if name_in not in graph.inputs or name_out not in graph.outputs or extra:
        raise UnsafeGraph(f"the frozen graph has no input {name_in!r} / output {name_out!r}, or other inputs "
                          f"(it has inputs {sorted(graph.inputs)}, outputs {sorted(graph.outputs)})")
    elem, dims = graph.inputs[name_in]
    fixed = [int(d) for d in chw]
    if elem != FLOAT or len(dims) != 1 + len(fixed) or any(isinstance(d, int) and d != c
                                                        for d, c in zip(dims[1:], fixed)):
        raise UnsafeGraph(f"the frozen graph takes {dims} (element type {elem}), the meta's images are "
                          f"float32 [N, {', '.join(map(str, fixed))}]")
    values[name_in] = Value((BATCH, *fixed))
    sizes: dict[str, int] = {name_in: math.prod(chw)}
    for node in graph.nodes:
        _infer(node, values, limit, sizes)
    if name_out not in sizes:
        raise UnsafeGraph(f"no node computes the output {name_out!r}")
    peak = _peak_bytes(graph, sizes, name_in)
    largest = max(sizes.items(), key=lambda kv: kv[1])
    ops: dict[str, int] = {}
    for node in graph.nodes:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return GraphReport(ops, sum(t.nbytes for t in graph.initializers), peak, largest, values[name_out].shape)


def admit_frozen_graph(blob: bytes, io: tuple[str, str], chw: Sequence[int], images: int) -> GraphReport:
    """`check_frozen_graph`, then refuse it unless loading it and running `images` at once fits in memory.

    Raises:
        UnsafeGraph: see `check_frozen_graph`.
        OverBudget: it would need more memory than the process can get (one line with both sizes).
    """
    report = check_frozen_graph(blob, io, chw)
    require_memory(report.memory(images),
                   f"the frozen graph ({report.weight_bytes >> 20} MiB of weights, "
                   f"{report.peak_bytes >> 20} MiB of activations per image, {images} images at a time)")
    return report


def _infer(node: Node, values: dict[str, Value], limit: int, sizes: dict[str, int]) -> None:
    """Infer one node's output; refuse an op, attribute, input or size the allow-list does not admit."""
    op = FROZEN_OPS.get(node.op_type)
    if op is None:
        raise UnsafeGraph(f"{node}: op {node.op_type!r} is not allowed in a frozen graph "
                          f"(allowed: {', '.join(sorted(FROZEN_OPS))})")
    unknown = sorted(set(node.attrs) - op.attributes)
    if unknown:
        raise _bad(node, f"unknown attributes {unknown}")
    low, high = op.inputs
    if not low <= len(node.inputs) <= high or len(node.outputs) != 1 or not node.inputs[0]:
        raise _bad(node, f"takes {len(node.inputs)} inputs and gives {len(node.outputs)} outputs")
    ins: list[Value | None] = []
    for name in node.inputs:
        if name and name not in values:
            raise _bad(node, f"reads {name!r} before any node computes it")
        ins.append(values[name] if name else None)
    for i, v in enumerate(ins[:low]):
        if v is None:
            raise _bad(node, f"input {i} is empty")
    try:
        out = op.infer(node, ins)
    except UnsafeGraph:
        raise
    except (TypeError, ValueError, IndexError, ZeroDivisionError) as e:  # attributes of the wrong kind
        raise _bad(node, f"attributes or inputs it cannot take ({type(e).__name__}: {e})") from None
    if out.shape.count(BATCH) > 1 or len(out.shape) > MAX_RANK:
        raise _bad(node, f"output shape {list(out.shape)} is not per image")
    size = math.prod(d for d in out.shape if d != BATCH)
    if size > limit:
        raise _bad(node, f"its output {list(out.shape)} has {size} elements per image, over the limit of {limit}")
    name = node.outputs[0]
    if name in values:
        raise _bad(node, f"computes {name!r}, which is already defined")
    values[name] = out
    sizes[name] = size


def _peak_bytes(graph: Graph, sizes: dict[str, int], name_in: str) -> int:
    """Float32 bytes alive at once at the fullest point of the node order, per image."""
    last = {name: len(graph.nodes) for name in graph.outputs}
    for i, node in enumerate(graph.nodes):
        for name in node.inputs:
            last[name] = max(last.get(name, i), i)
    alive = {name_in: 4 * sizes[name_in]}
    total = peak = alive[name_in]
    for i, node in enumerate(graph.nodes):
        for name in node.outputs:
            alive[name] = 4 * sizes[name]
            total += alive[name]
        peak = max(peak, total)
        for name in set(node.inputs) | set(node.outputs):
            if name in alive and last.get(name, i) <= i:
                total -= alive.pop(name)
    return peak
