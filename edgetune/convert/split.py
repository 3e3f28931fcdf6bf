"""Split a training graph at the frozen/trainable boundary and read the trainable part as the model's head.

A node is *trainable* when it depends, transitively, on a trainable initializer; everything else
that depends on the input is the frozen part. Exactly one tensor may cross from the frozen part into
the trainable part: the features. Every trainable node must be an op the device can train, with
attributes it implements: the runtime's op table (`edgetune.runtime.ops`) decides, and anything
else is refused by name, because a silently dropped op would train a different network than the
one exported. The nodes are then written as `meta.head`: the layer list when they form the seed's
chain of layers (`edgetune.runtime.head.head_list`, a version-1.0 file), else the node list of a
trainable sub-graph (`head_nodes`, version 2.0), whose other inputs are split into buffers (the
training graph's `buffers`: BatchNormalization running statistics) and constants.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from edgetune.errors import UserError
from edgetune.runtime.format import DTYPES
from edgetune.runtime.head import head_list, head_nodes
from edgetune.runtime.module import Node
from edgetune.runtime.ops import OPS, get_op


@dataclass
class Head:
    """The trainable part: the cut tensor, `meta.head` entries and the tensors they read.

    Attributes:
        boundary: the cut tensor's name in the training graph.
        layers: the `meta.head` entries (layer list, or node list when `graph`).
        params: trainable tensors by name.
        graph: the node list (version 2.0): the layer list cannot hold this trainable part.
        buffers: for the node list, the state tensors (running statistics) by name.
        constants: for the node list, the other fixed tensors the nodes read.
    """

    boundary: str
    layers: list[dict[str, Any]] = field(default_factory=list)
    params: dict[str, np.ndarray] = field(default_factory=dict)
    graph: bool = False
    buffers: dict[str, np.ndarray] = field(default_factory=dict)
    constants: dict[str, np.ndarray] = field(default_factory=dict)


class _Graph:
    """Name lookups over one ONNX graph: constants and how many readers each tensor has."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.consts: dict[str, onnx.TensorProto] = {i.name: i for i in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
                self.consts[node.output[0]] = node.attribute[0].t
        self.consumers: dict[str, int] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers[name] = self.consumers.get(name, 0) + 1
        for out in graph.output:
            self.consumers[out.name] = self.consumers.get(out.name, 0) + 1

    def const(self, name: str) -> np.ndarray | None:
        return numpy_helper.to_array(self.consts[name]) if name in self.consts else None


def depends_on(graph: onnx.GraphProto, sources: set[str]) -> list[onnx.NodeProto]:
    """The nodes that (transitively) read any of `sources`, in graph (topological) order."""
    reached = set(sources)
    nodes = []
    for node in graph.node:
        if any(name in reached for name in node.input):
            nodes.append(node)
            reached.update(node.output)
    return nodes


def split_head(model: onnx.ModelProto, trainable: Sequence[str], input_name: str, output_name: str,
               buffers: Sequence[str] = (), *, cut_name: str = "features", output_as: str = "logits") -> Head:
    """Find the boundary tensor and translate the trainable nodes into `meta.head` entries.

    Args:
        model: the training graph.
        trainable: the trainable initializers.
        input_name: the graph's image input.
        output_name: the graph's logits output.
        buffers: initializers the trainable part keeps as state (BatchNormalization running statistics).
        cut_name: what the node list calls the cut tensor (the frozen part's output in the `.tod`).
        output_as: what the node list calls the logits.

    Raises:
        UserError: trainable names that are not initializers, no or several boundary tensors, an
            op the runtime cannot train (named with its node), or a tensor the file cannot store.
    """
    graph = model.graph
    missing = sorted(set(trainable) - {i.name for i in graph.initializer})
    if missing:
        raise UserError(f"trainable parameters {missing} are not initializers of the graph")
    head_nodes_ = depends_on(graph, set(trainable))
    head_made = {o for n in head_nodes_ for o in n.output}
    data = {o for n in depends_on(graph, {input_name}) for o in n.output} | {input_name}
    crossing = sorted({i for n in head_nodes_ for i in n.input if i in data and i not in head_made})
    if output_name not in head_made:
        raise UserError(f"no trainable parameter affects the output {output_name!r}")
    if len(crossing) != 1:
        raise UserError(f"the trainable part must read exactly one tensor of the frozen part, it reads "
                        f"{len(crossing)}: {crossing}")
    g, trainable = _Graph(graph), set(trainable)
    nodes = _fuse_matmul_add([_node(n, g) for n in head_nodes_], g, trainable)
    for node in nodes:
        _check_trainable(node, g)
    params = {name: g.const(name).astype(np.float32) for name in trainable}
    constants = {name: g.const(name) for node in nodes for name in node.inputs
                 if name and name not in trainable and name in g.consts}
    state = {name: v for name, v in constants.items() if name in set(buffers)}
    if not state:
        try:
            layers, written = head_list(nodes, crossing[0], output_name, params, constants)
        except ValueError:  # not the seed's chain of layers: the node list below holds it
            pass
        else:
            unused = sorted(trainable - set(written))
            if unused:
                raise UserError(f"trainable parameters {unused} are not a weight or bias of a dense layer in the head")
            return Head(boundary=crossing[0], layers=layers, params=written)
    for name, value in constants.items():
        if value.dtype.name not in DTYPES:
            raise UserError(f"the trainable part reads constant {name!r} of type {value.dtype}, which a model "
                            f"file cannot hold ({', '.join(sorted(DTYPES))})")
    entries = head_nodes(nodes, {crossing[0]: cut_name, output_name: output_as})
    return Head(boundary=crossing[0], layers=entries, params=params, graph=True,
                buffers={n: np.asarray(v, np.float32) for n, v in state.items()},
                constants={n: v for n, v in constants.items() if n not in state})


def _node(node: onnx.NodeProto, g: _Graph) -> Node:
    attributes = {a.name: _attribute(onnx.helper.get_attribute_value(a)) for a in node.attribute}
    return Node(node.op_type, tuple(node.input), tuple(node.output), attributes, node.name)


def _attribute(value: Any) -> Any:
    """An attribute value as the op table takes it: strings decoded (ONNX gives bytes), lists as lists."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return list(value) if isinstance(value, (list, tuple)) else value


def _check_trainable(node: Node, g: _Graph) -> None:
    """The op table must know the op and accept its attributes; only its first output may be read."""
    try:
        get_op(node.op_type)(**node.attributes)
    except ValueError as e:
        if node.op_type not in OPS:
            raise UserError(f"unsupported op {node.op_type} in the trainable part (node {node.name!r}); "
                            f"the device trains: {', '.join(sorted(OPS))}") from None
        raise UserError(f"node {node.name!r} ({node.op_type}): {e}") from None
    if any(g.consumers.get(o, 0) for o in node.outputs[1:]):
        raise UserError(f"node {node.name!r} ({node.op_type}): only its first output may be used")


def _fuse_matmul_add(nodes: list[Node], g: _Graph, trainable: set[str]) -> list[Node]:
    """`MatMul(x, W)` then `Add(that, b)` with a trainable b is one linear layer: `Gemm(x, W, b)`.

    Some exporters write a linear layer that way; Gemm with transB=0 computes exactly the same.
    """
    out: list[Node] = []
    i = 0
    while i < len(nodes):
        node, nxt = nodes[i], nodes[i + 1] if i + 1 < len(nodes) else None
        if (node.op_type == "MatMul" and nxt is not None and nxt.op_type == "Add" and node.outputs[0] in nxt.inputs
                and g.consumers.get(node.outputs[0]) == 1):
            bias = next(x for x in nxt.inputs if x != node.outputs[0])
            if bias in trainable:  # (a frozen bias stays an Add of a constant: the node list holds it)
                out.append(Node("Gemm", (*node.inputs, bias), nxt.outputs, {}, node.name or nxt.name))
                i += 2
                continue
        out.append(node)
        i += 1
    return out
