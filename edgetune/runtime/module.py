"""`Module`: the trainable part, a small graph of ops run in numpy, with its loss.

A graph is ONNX's shape without the bytes: nodes of registered op types (`edgetune.runtime.ops`)
read and write named tensors. The module's input is the cut tensor the frozen part gives, its
output the logits; nodes also read parameters (trained), and constants (a dropout ratio, a shape).
`forward` runs the nodes in topological order; `backward` runs them in reverse, adding each
parameter's gradient into `Parameter.grad` and summing the gradients of a tensor several nodes read
(a residual branch). A tensor no parameter depends on (the cut, a constant) never gets a gradient:
each op is told through `needs_grad` which of its inputs need one.

Gradients accumulate until `zero_grad`, as in torch and ONNX Runtime training, so several batches
can make one optimizer step (`Optimizer.step`); see `__call__` for the exact semantics.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgetune.runtime import blas, heap
from edgetune.runtime.ops import Op, Parameter, get_loss, get_op
from edgetune.runtime.workers import Meeting, Peers, run_workers


@dataclass(frozen=True)
class Node:
    """One op of the graph: its ONNX op type, attributes, and the tensors it reads and writes.

    An input named "" is an optional input left out (ONNX's convention). Only the first output is
    computed; the others (e.g. Dropout's mask) must not be read by other nodes.
    """

    op_type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attributes: Mapping[str, Any] = field(default_factory=dict)
    name: str = ""


class Module:
    """The trainable part of a model: a graph of ops, its parameters and the loss.

    Args:
        nodes: the graph (any order: run in topological order, ties kept in the given order).
        parameters: the trainable tensors by name.
        input: the tensor the frozen part gives; never differentiated.
        output: the logits tensor.
        constants: fixed tensors the nodes read, by name.
        loss: the loss between logits and labels, by `meta["loss"]` name (`ops.loss.LOSSES`).
        rng: the generator random ops (dropout) draw from; its state travels in checkpoints.
        input_shape: the cut's per-sample shape, e.g. (192, 7, 7): the frozen part's output, which
            the feature cache keeps flat as (N, F) rows, is viewed as (N, *input_shape). None: (N, F).

    Constants are used as given, not copied: a BatchNormalization in batch-statistics mode updates
    its running statistics (buffers) in place, and the caller that passed them saves them.

    Raises:
        ValueError: an unknown op, an attribute it does not accept, a tensor nothing provides, a
            tensor written twice, a cycle, an output nothing computes, a parameter nothing reads.
    """

    def __init__(self, nodes: Sequence[Node], parameters: Mapping[str, Parameter], input: str, output: str,
                 constants: Mapping[str, np.ndarray] | None = None, loss: str = "softmax_cross_entropy",
                 rng: np.random.Generator | None = None, input_shape: Sequence[int] | None = None) -> None:
        self.params = dict(parameters)
        self.input_shape = None if input_shape is None else tuple(int(d) for d in input_shape)
        self.constants = {k: np.asarray(v) for k, v in (constants or {}).items()}
        self.input, self.output = input, output
        self.rng = rng if rng is not None else np.random.Generator(np.random.PCG64(0))
        self.nodes = _topological(nodes, {input, *self.params, *self.constants})
        self.ops: list[Op] = [_make_op(node) for node in self.nodes]
        self.loss_op = get_loss(loss)
        self.training = True
        self.loss = math.nan
        self.max_pass: int | None = None  # most samples per forward/backward pass (None: the whole batch)
        self.workers = 1  # threads a split batch's passes run on (`limit_activations`)
        self.sample_bytes = 0  # activation bytes one sample produces in a pass (measured by `check`)
        self._produced = 0
        self._check_wiring()
        last: dict[str, int] = {}  # node outputs by the index of the last node that reads them
        for i, node in enumerate(self.nodes):
            last.update((name, i) for name in node.inputs if name)
        self._last_read: dict[int, list[str]] = {}
        for node in self.nodes:
            name = node.outputs[0]
            if name != self.output and name in last:
                self._last_read.setdefault(last[name], []).append(name)
        differentiable = set(self.params)  # tensors some parameter's gradient flows through
        for node, op in zip(self.nodes, self.ops):
            op.rng = self.rng
            op.needs_grad = tuple(bool(name) and name in differentiable for name in node.inputs)
            if any(op.needs_grad):
                differentiable.add(node.outputs[0])

    # --- the small interface of everything trainable -------------------------------------------
    def parameters(self) -> list[Parameter]:
        """The trainable tensors, in the order the model lists them."""
        return list(self.params.values())

    def zero_grad(self) -> None:
        """Reset every parameter's accumulated gradient to zero."""
        for p in self.params.values():
            p.grad[...] = 0

    def train(self, mode: bool = True) -> Module:
        """Train mode (dropout on, `__call__` accumulates gradients) or, with False, eval mode."""
        self.training = bool(mode)
        for op in self.ops:
            op.training = self.training
        return self

    def eval(self) -> Module:
        """Eval mode: dropout off, `__call__` computes no gradient."""
        return self.train(False)

    def __call__(self, features: np.ndarray, labels: np.ndarray | None = None,
                 grad_scale: float = 1.0) -> dict[str, np.ndarray]:
        """Forward, the loss when labels are given, and in train mode backward (ONNX Runtime's train step).

        Gradients are *added* to `Parameter.grad` (call `zero_grad` first for a fresh step). The loss
        is the mean over this batch, so K batches of B samples accumulated with `grad_scale=1/K`
        give the gradient of the mean loss over all K*B samples: one `Optimizer.step` after them
        equals one step on a single batch of K*B (up to float32 rounding: sums run in another order).
        A batch larger than `max_pass` runs that way by itself, in passes of at most `max_pass`
        samples, `workers` of them at once on their own threads (`_parallel`), so only that many
        passes' activations are alive at once; a graph with an op that needs the whole batch (batch
        statistics) trains in one pass per worker, and the passes meet at that op. When the loss is
        not finite the gradients are not usable (the caller refuses the step; a single pass adds none).

        Args:
            features: (N, F) float32, the frozen part's output.
            labels: (N, num_classes) float one-hot or soft labels; required for training.
            grad_scale: multiplies the gradient of the loss (1/K for K accumulated batches).

        Returns:
            `{"logits": (N, C)}`, plus `"loss"` (a float32 scalar) when labels were given.
        """
        n = len(features)
        meet = self.training and any(op.mixes_samples for op in self.ops)
        if meet:  # one pass per worker, all alive at once: they meet where an op needs the whole batch
            parts = workers = max(1, min(n, self.workers))
        else:
            size = n if self.max_pass is None else max(1, self.max_pass)
            parts = workers = 1
            if n > size:
                parts = -(-n // size)  # passes of near-equal size, a multiple of the workers
                workers = min(self.workers, parts)
                parts = min(n, -(-parts // workers) * workers)
        if parts <= 1:
            logits, loss = self._pass(self.ops, self.loss_op, features, labels, grad_scale)
            self.loss = loss
            return self._outputs(logits, loss if labels is not None else None)
        bounds = [n * k // parts for k in range(parts + 1)]
        passes = [(features[a:b], None if labels is None else labels[a:b], grad_scale * (b - a) / n)
                  for a, b in zip(bounds, bounds[1:])]
        results = self._parallel(passes, workers, meet) if workers > 1 else \
            [self._pass(self.ops, self.loss_op, *p) for p in passes]
        loss = sum(pass_loss * (b - a) / n for (_, pass_loss), a, b in zip(results, bounds, bounds[1:]))
        self.loss = loss if labels is not None else math.nan
        return self._outputs(np.concatenate([logits for logits, _ in results]), loss if labels is not None else None)

    @staticmethod
    def _outputs(logits: np.ndarray, loss: float | None) -> dict[str, np.ndarray]:
        outputs = {"logits": logits}
        if loss is not None:
            outputs["loss"] = np.asarray(loss, dtype=np.float32)
        return outputs

    def _pass(self, ops: list[Op], loss_op: Op, features: np.ndarray, labels: np.ndarray | None,
              grad_scale: float, grads: dict[str, np.ndarray] | None = None,
              peers: Peers | None = None) -> tuple[np.ndarray, float]:
        """Forward, loss and (train mode, finite loss) backward of one pass with these op instances: (logits, loss).

        Gradients go into `Parameter.grad`, or with `grads` into that dict (a worker's own sums).
        With `peers` (passes that meet) the pass runs backward only when every pass's loss is finite,
        so all of them reach the same meetings."""
        logits, _ = self._forward(ops, features)
        if labels is None:
            return logits, math.nan
        loss = float(loss_op.forward(logits, labels))
        finite = math.isfinite(loss) if peers is None else peers.sum(int(not math.isfinite(loss))) == 0
        if self.training and finite:
            self._backward(ops, loss_op.backward(grad_scale)[0], grads)
        return logits, loss

    def _parallel(self, passes: list[tuple[np.ndarray, np.ndarray | None, float]],
                  workers: int, meet: bool = False) -> list[tuple[np.ndarray, float]]:
        """Run the passes on `workers` threads, pass k on worker k % workers, each with its own op instances.

        numpy releases the GIL in its loops and matrix products, so the element-wise work that keeps
        one core busy in a serial step spreads over all of them; each thread's products run on that
        thread alone (`blas.limited(1)`). Worker 0 (this thread) adds into `Parameter.grad`, the
        others into their own sums, added after it in worker order: the result does not depend on
        which thread finishes first, so a run is reproducible (and resumes bit-identically).
        With `meet` (one pass per worker) the ops that mix samples get their worker's seat at one
        `Meeting` (`Op.peers`); a worker that fails aborts it, so the others stop instead of waiting.
        """
        results: list[tuple[np.ndarray, float] | None] = [None] * len(passes)
        sums: list[dict[str, np.ndarray]] = [{} for _ in range(workers)]
        meeting = Meeting(workers) if meet else None
        def work(w: int) -> None:
            ops = self.ops if w == 0 else [copy.copy(op) for op in self.ops]
            loss_op = self.loss_op if w == 0 else copy.copy(self.loss_op)
            peers = None if meeting is None else Peers(meeting, w)
            for op in ops:
                if op.mixes_samples:
                    op.peers = peers
            try:
                for k in range(w, len(passes), workers):
                    results[k] = self._pass(ops, loss_op, *passes[k], None if w == 0 else sums[w], peers)
            except BaseException:
                if meeting is not None:
                    meeting.abort()
                raise
            finally:
                for op in ops:
                    op.release()
                    op.peers = None

        heap.one_arena()
        with blas.limited(1):
            run_workers(work, workers)
        for w in range(1, workers):
            for name, g in sums[w].items():
                self.params[name].grad += g
        return results  # type: ignore[return-value]

    # --- the engine -------------------------------------------------------------------------
    def forward(self, features: np.ndarray) -> np.ndarray:
        """Run every node in order on `features`; return the output tensor (the logits).

        Raises:
            ValueError: a node cannot take its inputs (their shapes are named in the message).
        """
        logits, self._produced = self._forward(self.ops, features)
        return logits

    def backward(self, grad: np.ndarray) -> None:
        """Propagate d loss / d output back through the last `forward`, adding into each `Parameter.grad`."""
        self._backward(self.ops, grad, None)

    def _forward(self, ops: list[Op], features: np.ndarray) -> tuple[np.ndarray, int]:
        """`forward` with these op instances: (output, bytes of every tensor made)."""
        if self.input_shape is not None:
            features = features.reshape(len(features), *self.input_shape)
        values: dict[str, np.ndarray] = {self.input: features, **self.constants}
        values.update((name, p.data) for name, p in self.params.items())
        produced = 0
        for i, (node, op) in enumerate(zip(self.nodes, ops)):
            args = [values[name] if name else None for name in node.inputs]
            try:
                values[node.outputs[0]] = out = op.forward(*args)
                produced += out.nbytes
            except ValueError as e:
                shapes = {name: None if a is None else tuple(a.shape) for name, a in zip(node.inputs, args)}
                raise ValueError(f"node {node.name or node.outputs[0]!r} ({op!r}) cannot take {shapes}: {e}") from None
            if not self.training:  # no backward follows: the op keeps nothing either
                op.release()
            for name in self._last_read.get(i, ()):  # what backward needs, the ops that need it keep
                del values[name]
        return values[self.output], produced

    def _backward(self, ops: list[Op], grad: np.ndarray, sums: dict[str, np.ndarray] | None) -> None:
        """`backward` with these op instances, adding parameter gradients into `sums` when given."""
        grads: dict[str, np.ndarray] = {self.output: grad}
        for node, op in zip(reversed(self.nodes), reversed(ops)):
            g = grads.pop(node.outputs[0], None)
            if g is None or not any(op.needs_grad):
                op.release()
                continue
            grads_in = op.backward(g)
            op.release()  # its saved activations are no longer needed
            for name, need, g_in in zip(node.inputs, op.needs_grad, grads_in):
                if not need or g_in is None:
                    continue
                if name in self.params:
                    if sums is None:
                        self.params[name].grad += g_in
                    else:  # a worker's own sum (a fresh array: g_in may be a view of another tensor)
                        sums[name] = sums[name] + g_in if name in sums else g_in.copy()
                else:  # a tensor read by several nodes: its gradient is the sum of theirs
                    grads[name] = grads[name] + g_in if name in grads else g_in

    def limit_activations(self, budget: int | None, threads: int = 1) -> None:
        """Split batches into passes whose activations stay within about `budget` bytes (None: never split),
        run on up to `threads` threads at once.

        A deep trainable part keeps megabytes per sample for its backward (Lite0's last block: ~2 MB,
        so 70 MB at batch 32); passes of a few samples bound that and run as fast, their tensors
        staying in cache. Passes that run at once share the budget. A graph where a sample's output
        depends on the others (batch-statistics BatchNormalization) trains in one pass per thread,
        whatever the budget, which meet to share the batch's statistics; one that draws random numbers
        (dropout) runs its passes one after the other, so the generator is read in the same order on
        every run. Needs `check` first (`sample_bytes`).
        """
        self.workers = 1
        if budget is None or not self.sample_bytes:
            self.max_pass = None
            return
        if not any(op.draws_random for op in self.ops):
            self.workers = max(1, int(threads))
        self.max_pass = max(1, int(budget) // (self.sample_bytes * self.workers))

    def check(self, features: int, num_classes: int) -> None:
        """Run one zero sample through the graph in eval mode: the shapes must chain to (1, num_classes).

        Done once at load, so a model whose layers do not fit together fails there with the node
        named, not an hour into training. Changes no parameter and draws no random number. Sets
        `sample_bytes`, the bytes of every tensor that sample made (what sizes `max_pass`).

        Raises:
            ValueError: a node cannot take its inputs' shapes, or the output is not (1, num_classes).
        """
        was_training = self.training
        try:
            out = self.eval().forward(np.zeros((1, features), np.float32))
        finally:
            self.train(was_training)
        self.sample_bytes = self._produced
        shape = tuple(out.shape)
        if shape != (1, num_classes):
            raise ValueError(f"the trainable part turns {features} frozen features into {shape[1:]} values "
                             f"per image, not num_classes={num_classes}")

    def _check_wiring(self) -> None:
        read = {name for node in self.nodes for name in node.inputs if name}
        for node in self.nodes:
            extra = [name for name in node.outputs[1:] if name in read]
            if extra:
                raise ValueError(f"node {node.name or node.outputs[0]!r} ({node.op_type}): only its first output "
                                 f"can be read, {extra} are")
        if self.output not in {node.outputs[0] for node in self.nodes}:
            raise ValueError(f"no node computes the output {self.output!r}")
        unused = sorted(set(self.params) - read)
        if unused:
            raise ValueError(f"parameters {unused} are read by no node")

    def __repr__(self) -> str:
        shapes = ", ".join(f"{n}{tuple(p.data.shape)}" for n, p in self.params.items())
        chain = " -> ".join(repr(op) for op in self.ops) if len(self.ops) <= 8 else \
            f"{len(self.ops)} nodes ({', '.join(sorted({n.op_type for n in self.nodes}))})"
        return f"Module({self.input} -> {chain} -> {self.output}; parameters {shapes})"


def _make_op(node: Node) -> Op:
    try:
        return get_op(node.op_type)(**node.attributes)
    except ValueError as e:  # UnknownOp, or an attribute value the op does not implement
        raise ValueError(f"node {node.name or node.outputs[0]!r} ({node.op_type}): {e}") from None


def _topological(nodes: Sequence[Node], given: set[str]) -> list[Node]:
    """`nodes` ordered so each runs after the nodes it reads from (Kahn; ties keep the given order)."""
    producer: dict[str, int] = {}
    for i, node in enumerate(nodes):
        if not node.outputs or not node.outputs[0]:
            raise ValueError(f"node {node.name!r} ({node.op_type}) has no output")
        for name in node.outputs:
            if name in producer or name in given:
                raise ValueError(f"tensor {name!r} is written twice (node {node.name or name!r})")
            producer[name] = i
    for node in nodes:
        for name in node.inputs:
            if name and name not in producer and name not in given:
                raise ValueError(f"node {node.name or node.outputs[0]!r} ({node.op_type}) reads {name!r}, which is "
                                 f"no parameter, constant, input or node output")
    done: set[int] = set()
    order: list[Node] = []
    while len(order) < len(nodes):
        ready = next((i for i, node in enumerate(nodes) if i not in done
                      and all(producer.get(name) in done for name in node.inputs if name in producer)), None)
        if ready is None:
            raise ValueError("the graph has a cycle")
        done.add(ready)
        order.append(nodes[ready])
    return order
