"""Split a training graph at the frozen/trainable boundary and read the trainable part as the model's head.

A node is *trainable* when it depends, transitively, on a trainable initializer; everything else
that depends on the input is the frozen part. Exactly one tensor may cross from the frozen part into
the trainable part: the features. Every trainable node must be an op the device can train, with
attributes it implements: the runtime's op table (`edgetune.runtime.ops`) decides, and anything
else is refused by name, because a silently dropped op would train a different network than the
one exported. The nodes are then written as `meta.head` (`edgetune.runtime.head.head_list`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from edgetune.errors import UserError
from edgetune.runtime.head import head_list
from edgetune.runtime.module import Node
from edgetune.runtime.ops import OPS, get_op


@dataclass
class Head:
    """The trainable part: the cut tensor, `meta.head` layers and the parameter values."""

    boundary: str
    layers: list[dict[str, Any]] = field(default_factory=list)
    params: dict[str, np.ndarray] = field(default_factory=dict)


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


def split_head(model: onnx.ModelProto, trainable: Sequence[str], input_name: str, output_name: str) -> Head:
    """Find the boundary tensor and translate the trainable nodes into `meta.head` layers.

    Raises:
        UserError: trainable names that are not initializers, no or several boundary tensors, a
            head that is not a chain, or an op the runtime cannot train (named with its node).
    """
    graph = model.graph
    missing = sorted(set(trainable) - {i.name for i in graph.initializer})
    if missing:
        raise UserError(f"trainable parameters {missing} are not initializers of the graph")
    head_nodes = depends_on(graph, set(trainable))
    head_made = {o for n in head_nodes for o in n.output}
    data = {o for n in depends_on(graph, {input_name}) for o in n.output} | {input_name}
    crossing = sorted({i for n in head_nodes for i in n.input if i in data and i not in head_made})
    if output_name not in head_made:
        raise UserError(f"no trainable parameter affects the output {output_name!r}")
    if len(crossing) != 1:
        raise UserError(f"the trainable part must read exactly one tensor of the frozen part, it reads "
                        f"{len(crossing)}: {crossing}")
    g, trainable = _Graph(graph), set(trainable)
    nodes = _fuse_matmul_add([_node(n, g) for n in head_nodes], g, trainable)
    for node in nodes:
        _check_trainable(node, g, output_name)
    params = {name: g.const(name).astype(np.float32) for name in trainable}
    constants = {name: g.const(name) for node in nodes for name in node.inputs
                 if name and name not in trainable and name in g.consts}
    try:
        layers, written = head_list(nodes, crossing[0], output_name, params, constants)
    except ValueError as e:  # what the head list cannot hold, with the node named
        raise UserError(str(e)) from None
    unused = sorted(trainable - set(written))
    if unused:
        raise UserError(f"trainable parameters {unused} are not a weight or bias of a dense layer in the head")
    return Head(boundary=crossing[0], layers=layers, params=written)


def _node(node: onnx.NodeProto, g: _Graph) -> Node:
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    return Node(node.op_type, tuple(node.input), tuple(node.output), attributes, node.name)


def _check_trainable(node: Node, g: _Graph, output_name: str) -> None:
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
    if node.outputs[0] != output_name and g.consumers.get(node.outputs[0], 0) != 1:
        raise UserError(f"the trainable part must be a chain of layers; the output of node {node.name!r} "
                        f"({node.op_type}) is read {g.consumers.get(node.outputs[0], 0)} times")


def _fuse_matmul_add(nodes: list[Node], g: _Graph, trainable: set[str]) -> list[Node]:
    """`MatMul(x, W)` then `Add(that, b)` with a trainable b is one linear layer: `Gemm(x, W, b)`.

    Some exporters write a linear layer that way; Gemm with transB=0 computes exactly the same.

    Raises:
        UserError: the added tensor is a frozen initializer (a frozen bias inside the head).
    """
    out: list[Node] = []
    i = 0
    while i < len(nodes):
        node, nxt = nodes[i], nodes[i + 1] if i + 1 < len(nodes) else None
        if (node.op_type == "MatMul" and nxt is not None and nxt.op_type == "Add" and node.outputs[0] in nxt.inputs
                and g.consumers.get(node.outputs[0]) == 1):
            bias = next(x for x in nxt.inputs if x != node.outputs[0])
            if bias in g.consts and bias not in trainable:
                raise UserError(f"node {nxt.name!r} (Add): its bias {bias!r} is not trainable; a frozen layer "
                                f"inside the head is not supported")
            if bias in trainable:
                out.append(Node("Gemm", (*node.inputs, bias), nxt.outputs, {}, node.name or nxt.name))
                i += 2
                continue
        out.append(node)
        i += 1
    return out
