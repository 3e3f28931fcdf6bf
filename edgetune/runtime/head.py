"""`meta["head"]`: the `.tod`'s form of the trainable part, read into graph nodes and written from them.

Two forms (docs/FORMAT.md `head`):

- the *layer list* (version 1.0): a chain of layers, each entry standing for one node of an ONNX op
  type (`HEAD_OPS`); `head_list` writes it, and the converter uses it whenever the trainable part
  is such a chain (the seed's head), so those files stay version 1.0, byte for byte;
- the *node list* (version 2.0): a trainable sub-graph cut out of a backbone (Conv, BatchNormalization,
  residual Adds: a DAG), one entry per ONNX node with its op type, named inputs and outputs and
  attributes; `head_nodes` writes it. It reads the cut tensor (`meta.frozen.output`) and writes `OUTPUT`.

`head_graph` reads either for the runtime's `Module`. Both directions live here, so the runtime,
the converter and the benchmark read one table; the op types themselves are the op registry's
(`edgetune.runtime.ops`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from edgetune.runtime.module import Node

# meta["head"] op name -> the ONNX op type of the node it stands for
HEAD_OPS = {"dense": "Gemm", "relu": "Relu", "dropout": "Dropout", "flatten": "Flatten", "identity": "Identity"}
OUTPUT = "logits"


def head_graph(head: Sequence[Mapping[str, Any]], input: str,
               params: Mapping[str, np.ndarray]) -> tuple[list[Node], dict[str, np.ndarray]]:
    """The nodes and constants `meta["head"]` stands for, reading `input` (the cut) and writing `OUTPUT`.

    `dense` is `Gemm(transB=1)` over the (out, in) weight and the bias (torch.nn.Linear); `dropout`
    is `Dropout` with its `p` as a float64 constant ratio (so `p` is used exactly as written);
    `flatten` is `Flatten(axis=1)`.

    Args:
        head: the entries, in order.
        input: the tensor the first entry reads.
        params: the model's parameter values by name (a dense weight must be 2-D, its bias 1-D).

    Raises:
        ValueError: an entry that is not an object, an unknown op, a dense layer naming parameters
            the model does not have or of the wrong rank, a dropout `p` outside [0, 1).
    """
    if not head:
        raise ValueError("the head has no layers")
    if is_node_list(head):
        return _graph_nodes(head), {}
    nodes: list[Node] = []
    constants: dict[str, np.ndarray] = {}
    current = input
    for i, item in enumerate(head):
        op = item.get("op") if isinstance(item, Mapping) else None
        if not isinstance(op, str) or op not in HEAD_OPS:
            raise ValueError(f"head op {i}: unknown op {op!r}; known: {sorted(HEAD_OPS)}")
        out = OUTPUT if i == len(head) - 1 else f"edgetune_head/{i}"
        attributes: dict[str, Any] = {}
        if op == "dense":
            inputs = (current, *_dense_params(i, item, params))
            attributes["transB"] = 1
        elif op == "dropout":
            p = item.get("p", 0.5)
            if not (type(p) in (int, float) and 0.0 <= p < 1.0):
                raise ValueError(f"head op {i}: dropout p must be a number in [0, 1), got {p!r}")
            ratio = f"edgetune_head/{i}/ratio"
            constants[ratio] = np.asarray(float(p), np.float64)
            inputs = (current, ratio)
        else:
            inputs = (current,)
            if op == "flatten":
                attributes["axis"] = 1
        nodes.append(Node(HEAD_OPS[op], inputs, (out,), attributes, name=f"head/{i}"))
        current = out
    return nodes, constants


def is_node_list(head: Sequence[Any]) -> bool:
    """Whether `meta["head"]` is the node list (version 2.0) rather than the layer list: its entries name inputs."""
    return bool(head) and all(isinstance(e, Mapping) and "inputs" in e for e in head)


def _graph_nodes(head: Sequence[Mapping[str, Any]]) -> list[Node]:
    """The node list's entries as `Node`s; the `Module` then checks ops, attributes and wiring."""
    nodes = []
    for i, e in enumerate(head):
        op, name, attributes = e.get("op"), e.get("name", f"head/{i}"), e.get("attributes", {})
        inputs, outputs = e.get("inputs"), e.get("outputs")
        if not (isinstance(op, str) and isinstance(name, str) and isinstance(attributes, Mapping)
                and isinstance(inputs, list) and all(isinstance(x, str) for x in inputs)
                and isinstance(outputs, list) and len(outputs) == 1 and isinstance(outputs[0], str) and outputs[0]):
            raise ValueError(f"head node {i} must be {{op, name, inputs: [names], outputs: [one name], "
                             f"attributes: {{}}}}, got {dict(e)!r:.120}")
        nodes.append(Node(op, tuple(inputs), tuple(outputs), dict(attributes), name))
    if OUTPUT not in {n.outputs[0] for n in nodes}:
        raise ValueError(f"no head node writes the output {OUTPUT!r}")
    return nodes


def head_nodes(nodes: Sequence[Node], rename: Mapping[str, str]) -> list[dict[str, Any]]:
    """Write a trainable sub-graph as the node list (version 2.0): one entry per node, first output only.

    Args:
        nodes: the trainable part in topological order; only each node's first output may be read
            (the converter checked).
        rename: tensor names to change, e.g. the cut to `meta.frozen.output` and the graph's output
            to `OUTPUT`.

    Returns:
        The entries, attributes as JSON values (ONNX string attributes decoded from bytes).
    """
    def value(v: Any) -> Any:
        if isinstance(v, bytes):
            return v.decode("utf-8")
        if isinstance(v, (list, tuple)):
            return [value(x) for x in v]
        if isinstance(v, np.generic):
            return v.item()
        return v

    return [{"op": n.op_type, "name": n.name, "inputs": [rename.get(x, x) for x in n.inputs],
             "outputs": [rename.get(n.outputs[0], n.outputs[0])],
             "attributes": {k: value(v) for k, v in sorted(n.attributes.items())}} for n in nodes]


def _dense_params(i: int, item: Mapping[str, Any], params: Mapping[str, np.ndarray]) -> tuple[str, ...]:
    weight, bias = item.get("weight"), item.get("bias")
    missing = [n for n in (weight, bias) if n is not None and n not in params]
    if not isinstance(weight, str) or (bias is not None and not isinstance(bias, str)) or missing:
        raise ValueError(f"head op {i} (dense) names parameters the model does not have: {missing or [weight]}")
    w = params[weight]
    if w.ndim != 2:
        raise ValueError(f"dense weight {weight} must be 2-D (out, in), got shape {w.shape}")
    if bias is not None and params[bias].shape != w.shape[:1]:
        raise ValueError(f"dense bias {bias} has shape {params[bias].shape}, expected {w.shape[:1]}")
    return (weight,) if bias is None else (weight, bias)


def head_list(nodes: Sequence[Node], input: str, output: str, params: Mapping[str, np.ndarray],
              constants: Mapping[str, np.ndarray]) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """Write a chain of nodes as `meta["head"]`, with the parameters in the file's layout.

    Args:
        nodes: the trainable part in order; each must read the previous one's output (the first
            reads `input`) and the last must write `output`.
        input: the cut tensor.
        output: the graph's output.
        params: trainable tensor values by name; a dense layer's weight and bias must be among them.
        constants: the values of the other tensors the nodes read (e.g. a dropout ratio).

    Returns:
        The entries and the parameters they name: dense weights as (out, in) float32 (a `Gemm`
        without transB and a `MatMul` store (in, out): transposed here).

    Raises:
        ValueError: what the list form cannot write, naming the node: not a chain, a frozen weight
            inside the head, a Flatten of another axis, a reshape other than to (B, -1), a
            non-constant dropout ratio.
    """
    entries: list[dict[str, Any]] = []
    written: dict[str, np.ndarray] = {}
    current = input
    for node in nodes:
        where = f"node {node.name!r} ({node.op_type})"
        reads = [name for name in node.inputs if name and name not in params and name not in constants]
        if reads != [current] or node.inputs[0] != current:
            raise ValueError(f"the trainable part must be a chain of layers; {where} reads {reads}, "
                             f"expected only {current!r}")
        entries.append(_entry(node, where, params, constants, written))
        current = node.outputs[0]
    if current != output:
        raise ValueError(f"the trainable chain ends at {current!r}, not at the output {output!r}")
    return entries, written


class _Writer:
    """Writes one node as its `meta["head"]` entry; dense parameters go into `written` in the file's layout."""

    def __init__(self, where: str, params: Mapping[str, np.ndarray], constants: Mapping[str, np.ndarray],
                 written: dict[str, np.ndarray]) -> None:
        self.where, self.params, self.constants, self.written = where, params, constants, written

    def param(self, name: str, what: str) -> np.ndarray:
        if name not in self.params:
            raise ValueError(f"{self.where}: its {what} {name!r} is not trainable; a frozen layer inside the head "
                             f"is not supported")
        return np.asarray(self.params[name], np.float32)

    def dense(self, node: Node) -> dict[str, Any]:
        weight, bias = node.inputs[1], (node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] else None)
        w = self.param(weight, "weight")
        if w.ndim != 2:
            raise ValueError(f"{self.where}: weight {weight!r} of shape {w.shape} is not a dense layer")
        w = w if node.attributes.get("transB", 0) else w.T  # the file keeps (out, in) as torch.nn.Linear
        self.written[weight] = np.ascontiguousarray(w)
        if bias is not None:
            b = self.param(bias, "bias")
            if b.size != w.shape[0]:
                raise ValueError(f"{self.where}: bias {bias!r} of shape {b.shape} does not fit weight {w.shape}")
            self.written[bias] = b.reshape(-1)
        return {"op": "dense", "weight": weight, "bias": bias}

    def dropout(self, node: Node) -> dict[str, Any]:
        ratio = node.inputs[1] if len(node.inputs) > 1 and node.inputs[1] else None
        if ratio is not None and ratio not in self.constants:
            raise ValueError(f"{self.where}: the ratio must be a constant")
        value = np.float32(0.5 if ratio is None else self.constants[ratio])
        return {"op": "dropout", "p": float(str(value))}  # the shortest decimal: 0.2, not 0.20000000298

    def flatten(self, node: Node) -> dict[str, Any]:
        axis = node.attributes.get("axis", 1)
        if axis != 1:
            raise ValueError(f"{self.where}: only axis=1 can be written in the model's head, got {axis}")
        return {"op": "flatten"}

    def reshape(self, node: Node) -> dict[str, Any]:
        shape = self.constants.get(node.inputs[1]) if len(node.inputs) > 1 else None
        if shape is None or shape.shape != (2,) or not (shape[1] == -1 or shape[0] in (0, -1)):
            raise ValueError(f"{self.where}: only a constant reshape to (B, -1) can be written in the model's "
                             f"head, got {None if shape is None else shape.tolist()}")
        return {"op": "flatten"}


# ONNX op type -> how the list form writes it (the inverse of HEAD_OPS, plus MatMul and Reshape)
_WRITE = {"Gemm": _Writer.dense, "MatMul": _Writer.dense, "Relu": lambda w, node: {"op": "relu"},
          "Identity": lambda w, node: {"op": "identity"}, "Dropout": _Writer.dropout,
          "Flatten": _Writer.flatten, "Reshape": _Writer.reshape}


def _entry(node: Node, where: str, params: Mapping[str, np.ndarray], constants: Mapping[str, np.ndarray],
           written: dict[str, np.ndarray]) -> dict[str, Any]:
    """One `meta["head"]` entry for `node`."""
    if node.op_type not in _WRITE:
        raise ValueError(f"{where}: the device can train it, but the model's head list cannot hold it yet "
                         f"(it holds {', '.join(sorted(_WRITE))})")
    return _WRITE[node.op_type](_Writer(where, params, constants, written), node)
