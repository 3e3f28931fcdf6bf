"""Averaging ops in numpy: `GlobalAveragePool` and `ReduceMean` (PyTorch exports `AdaptiveAvgPool2d(1)` as the latter).

Both spread the gradient evenly back over what they averaged: `dx = broadcast(g) / count`, laid
out in memory as their input was (channels-last in a conv chain, see `conv.py`), so the ops
before them keep working on contiguous channels.
"""

from __future__ import annotations

import numpy as np

from edgetune.runtime.ops.base import Op, UnknownOp, register_op


def _memory_order(x: np.ndarray) -> tuple[int, ...]:
    """x's axes from the outermost in memory to the innermost."""
    return tuple(int(a) for a in np.argsort([-abs(s) for s in x.strides], kind="stable"))


def _spread(grad: np.ndarray, shape: tuple[int, ...], order: tuple[int, ...], count: int) -> np.ndarray:
    """broadcast(grad) / count as a new array of `shape`, its memory in `order`."""
    out = np.empty([shape[a] for a in order], dtype=grad.dtype).transpose(np.argsort(order))
    np.divide(grad, count, out=out)
    return out


@register_op("GlobalAveragePool")
class GlobalAveragePool(Op):
    """(N, C, H, W, ...) -> (N, C, 1, 1, ...): the mean over every spatial axis."""

    def forward(self, x: np.ndarray) -> np.ndarray:
        self._shape, self._order = x.shape, _memory_order(x)
        return x.mean(axis=tuple(range(2, x.ndim)), keepdims=True)

    def backward(self, grad: np.ndarray) -> tuple[np.ndarray | None, ...]:
        return (_spread(grad, self._shape, self._order, int(np.prod(self._shape[2:]))),)


@register_op("ReduceMean")
class ReduceMean(Op):
    """The mean over `axes` (opset 18: a constant second input; absent = all axes, or none with
    `noop_with_empty_axes=1`), keeping the reduced axes as size 1 when `keepdims=1`."""

    attributes = {"keepdims": 1, "noop_with_empty_axes": 0}

    def forward(self, x: np.ndarray, *axes_input: np.ndarray | None) -> np.ndarray:
        axes = axes_input[0] if axes_input else None
        self._shape, self._order, self._inputs = x.shape, _memory_order(x), 1 + len(axes_input)
        if axes is None or np.size(axes) == 0:
            if self.attrs["noop_with_empty_axes"]:
                self._axes: tuple[int, ...] = ()
                return x
            self._axes = tuple(range(x.ndim))
        else:
            given = [int(a) for a in np.asarray(axes).reshape(-1)]
            if not all(-x.ndim <= a < x.ndim for a in given):
                raise UnknownOp(f"ReduceMean: axes {given} out of range for a {x.ndim}-D input")
            self._axes = tuple(sorted({a % x.ndim for a in given}))
        return x.mean(axis=self._axes, keepdims=bool(self.attrs["keepdims"]))

    def backward(self, grad: np.ndarray) -> tuple[np.ndarray | None, ...]:
        rest = (None,) * (self._inputs - 1)
        if not self._axes:
            return (grad, *rest)
        count = int(np.prod([self._shape[a] for a in self._axes]))
        kept = grad if self.attrs["keepdims"] else np.expand_dims(grad, self._axes)
        return (_spread(kept, self._shape, self._order, count), *rest)
