"""Split a training graph at the frozen/trainable boundary and read the trainable part as a layer list.

A node is *trainable* when it depends, transitively, on a trainable initializer; everything else
that depends on the input is the frozen part. Exactly one tensor may cross from the frozen part into
the trainable part: the features. The trainable part must then be a chain of the few ops the
device's numpy runtime implements (`meta.head`, docs/FORMAT.md); anything else is refused by name,
because a silently dropped op would train a different network than the one exported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from edgetune.errors import UserError

SUPPORTED = ("Gemm", "MatMul (+ Add)", "Relu", "Flatten", "Reshape to (B, -1)", "Dropout", "Identity")


@dataclass
class Head:
    """The trainable part: the cut tensor, `meta.head` layers and the parameter values."""

    boundary: str
    layers: list[dict[str, Any]] = field(default_factory=list)
    params: dict[str, np.ndarray] = field(default_factory=dict)


class _Graph:
    """Name lookups over one ONNX graph: constants, producers, consumers."""

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
    head = Head(boundary=crossing[0])
    _Translator(_Graph(graph), head, set(trainable), data | head_made).run(head_nodes, output_name)
    unused = sorted(set(trainable) - set(head.params))
    if unused:
        raise UserError(f"trainable parameters {unused} are not a weight or bias of a dense layer in the head")
    return head


class _Translator:
    """Walks the trainable chain node by node, appending `meta.head` layers."""

    def __init__(self, g: _Graph, head: Head, trainable: set[str], data: set[str]) -> None:
        self.g, self.head, self.trainable, self.data = g, head, trainable, data

    def run(self, nodes: list[onnx.NodeProto], output_name: str) -> None:
        current = self.head.boundary
        i = 0
        while i < len(nodes):
            node = nodes[i]
            handler = getattr(self, f"_op_{node.op_type}", None)
            if handler is None:
                raise UserError(f"unsupported op {node.op_type} in the trainable part (node {node.name!r}); "
                                f"supported: {', '.join(SUPPORTED)}")
            ins = [x for x in node.input if x in self.data]
            branches = current != self.head.boundary and self.g.consumers.get(current, 0) != 1
            if ins != [current] or branches:
                raise UserError(f"the trainable part must be a chain of layers; node {node.name!r} "
                                f"({node.op_type}) reads {ins}, expected only {current!r}")
            if any(self.g.consumers.get(o, 0) for o in node.output[1:]):
                raise UserError(f"node {node.name!r} ({node.op_type}): only its first output may be used")
            consumed = handler(node, nodes[i + 1] if i + 1 < len(nodes) else None)
            current = nodes[i + consumed - 1].output[0]
            i += consumed
        if current != output_name:
            raise UserError(f"the trainable chain ends at {current!r}, not at the output {output_name!r}")

    def _param(self, node: onnx.NodeProto, name: str, what: str) -> np.ndarray:
        if name not in self.trainable:
            raise UserError(f"node {node.name!r} ({node.op_type}): its {what} {name!r} is not trainable; "
                            f"a frozen layer inside the head is not supported")
        return self.g.const(name).astype(np.float32)

    def _dense(self, node: onnx.NodeProto, weight: str, w: np.ndarray, bias: str | None, b: np.ndarray | None) -> None:
        if w.ndim != 2 or (b is not None and b.size != w.shape[0]):
            raise UserError(f"node {node.name!r}: weight shape {w.shape} and bias shape "
                            f"{None if b is None else b.shape} are not a dense layer")
        self.head.params[weight] = np.ascontiguousarray(w)
        if bias is not None:
            self.head.params[bias] = b.reshape(-1)
        self.head.layers.append({"op": "dense", "weight": weight, "bias": bias})

    def _op_Gemm(self, node: onnx.NodeProto, _next: onnx.NodeProto | None) -> int:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
        has_bias = len(node.input) > 2 and node.input[2] != ""
        if alpha != 1.0 or attrs.get("transA", 0) != 0 or (has_bias and beta != 1.0):
            raise UserError(f"node {node.name!r} (Gemm): only alpha=1, beta=1, transA=0 is supported, got "
                            f"alpha={alpha} beta={beta} transA={attrs.get('transA', 0)}")
        w = self._param(node, node.input[1], "weight")
        w = w if attrs.get("transB", 0) else w.T  # the runtime keeps (out, in) as torch.nn.Linear
        bias = node.input[2] if has_bias else None
        self._dense(node, node.input[1], w, bias, self._param(node, bias, "bias") if bias else None)
        return 1

    def _op_MatMul(self, node: onnx.NodeProto, nxt: onnx.NodeProto | None) -> int:
        if node.input[0] not in self.data:
            raise UserError(f"node {node.name!r} (MatMul): the features must be the first operand")
        w = self._param(node, node.input[1], "weight").T
        if (nxt is not None and nxt.op_type == "Add" and node.output[0] in nxt.input
                and self.g.consumers.get(node.output[0]) == 1):
            bias = next(x for x in nxt.input if x != node.output[0])
            self._dense(node, node.input[1], w, bias, self._param(nxt, bias, "bias"))
            return 2
        self._dense(node, node.input[1], w, None, None)
        return 1

    def _op_Relu(self, node: onnx.NodeProto, _next: onnx.NodeProto | None) -> int:
        self.head.layers.append({"op": "relu"})
        return 1

    def _op_Identity(self, node: onnx.NodeProto, _next: onnx.NodeProto | None) -> int:
        self.head.layers.append({"op": "identity"})
        return 1

    def _op_Dropout(self, node: onnx.NodeProto, _next: onnx.NodeProto | None) -> int:
        ratio = self.g.const(node.input[1]) if len(node.input) > 1 and node.input[1] else np.array(0.5)
        if ratio is None:
            raise UserError(f"node {node.name!r} (Dropout): the ratio must be a constant")
        p = float(str(np.float32(ratio)))  # the shortest decimal of the float32: 0.2, not 0.20000000298
        self.head.layers.append({"op": "dropout", "p": p})
        return 1

    def _op_Flatten(self, node: onnx.NodeProto, _next: onnx.NodeProto | None) -> int:
        axis = next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 1)
        if axis != 1:
            raise UserError(f"node {node.name!r} (Flatten): only axis=1 is supported, got {axis}")
        self.head.layers.append({"op": "flatten"})
        return 1

    def _op_Reshape(self, node: onnx.NodeProto, _next: onnx.NodeProto | None) -> int:
        shape = self.g.const(node.input[1])
        if shape is None or shape.shape != (2,) or not (shape[1] == -1 or shape[0] in (0, -1)):
            raise UserError(f"node {node.name!r} (Reshape): only a constant reshape to (B, -1) is supported, "
                            f"got {None if shape is None else shape.tolist()}")
        self.head.layers.append({"op": "flatten"})
        return 1
