"""Element-wise ONNX ops in numpy: `Clip` (ReLU6), `Add` (residuals, biases), `Mul`, `Sigmoid` (swish, squeeze-excite).

`Add` and `Mul` follow numpy (= ONNX multidirectional) broadcasting; their backward sums each
gradient back to its input's shape over the axes that input was broadcast along, so a per-channel
(1, C, 1, 1) operand gets a per-channel gradient and a residual's two (N, C, H, W) operands each
get the full one.
"""

from __future__ import annotations

import numpy as np

from edgetune.runtime.ops.base import Op, register_op


def unbroadcast(grad: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Sum `grad` down to `shape`: over leading axes the operand lacked and over its size-1 axes."""
    if grad.shape == shape:
        return grad
    lead = grad.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(lead + i for i, n in enumerate(shape) if n == 1 and grad.shape[lead + i] != 1)
    return grad.sum(axis=axes, keepdims=True).reshape(shape)


@register_op("Clip")
class Clip(Op):
    """`min(max(x, lo), hi)`, `lo`/`hi` constant inputs (absent or None: unbounded); ReLU6 is Clip(x, 0, 6).

    The gradient passes where `lo < x < hi`, strictly, as PyTorch's `hardtanh`/`ReLU6` and `relu`
    do: at exactly a bound it is 0. The bounds are constants of the graph and get no gradient.
    """

    def forward(self, x: np.ndarray, *bounds: np.ndarray | None) -> np.ndarray:
        lo, hi = (None if b is None else np.asarray(b, dtype=x.dtype) for b in (*bounds, None, None)[:2])
        self._inputs = 1 + len(bounds)
        # the mask is built from comparisons of x so it keeps x's memory layout (channels-last after a
        # Conv): a mask in another layout makes this op's and every later op's passes strided, 3-4x slower
        if not self.training:  # no backward follows
            keep = None
        elif lo is not None and hi is not None:
            keep = (x > lo) & (x < hi)
        elif lo is not None or hi is not None:
            keep = x > lo if lo is not None else x < hi
        else:
            keep = np.ones_like(x, dtype=bool)
        self._keep = keep
        return np.clip(x, lo, hi) if lo is not None or hi is not None else x.copy()

    def backward(self, grad: np.ndarray) -> tuple[np.ndarray | None, ...]:
        return (grad * self._keep,) + (None,) * (self._inputs - 1)


@register_op("Add")
class Add(Op):
    """`a + b`, broadcasting."""

    def forward(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        self._shapes = a.shape, b.shape
        return a + b

    def backward(self, grad: np.ndarray) -> tuple[np.ndarray | None, ...]:
        return unbroadcast(grad, self._shapes[0]), unbroadcast(grad, self._shapes[1])


@register_op("Mul")
class Mul(Op):
    """`a * b`, broadcasting: da = g b, db = g a (each summed back to its operand's shape)."""

    def forward(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        self._a, self._b = a, b
        return a * b

    def backward(self, grad: np.ndarray) -> tuple[np.ndarray | None, ...]:
        want = [not self.needs_grad or self.needs_grad[i] for i in range(2)]
        ga = unbroadcast(grad * self._b, np.shape(self._a)) if want[0] else None
        gb = unbroadcast(grad * self._a, np.shape(self._b)) if want[1] else None
        return ga, gb


@register_op("Sigmoid")
class Sigmoid(Op):
    """`1 / (1 + exp(-x))`, computed without overflow; dy/dx = y (1 - y)."""

    def forward(self, x: np.ndarray) -> np.ndarray:
        e = np.exp(-np.abs(x))  # never overflows
        self._y = np.where(x >= 0, 1 / (1 + e), e / (1 + e))
        return self._y

    def backward(self, grad: np.ndarray) -> tuple[np.ndarray | None, ...]:
        return (grad * self._y * (1 - self._y),)
