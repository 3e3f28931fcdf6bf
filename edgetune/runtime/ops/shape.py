"""Ops that only move values around: `Flatten`, `Reshape`, `Identity`. Their backward undoes the move."""

from __future__ import annotations

import math

import numpy as np

from edgetune.runtime.ops.base import Op, register_op


@register_op("Flatten")
class Flatten(Op):
    """Collapse the axes before `axis` into one and those from `axis` on into another (axis=1: `torch.nn.Flatten()`)."""

    attributes = {"axis": 1}

    def forward(self, x: np.ndarray) -> np.ndarray:
        self._shape = x.shape
        axis = self.attrs["axis"] % x.ndim if x.ndim else 0
        return x.reshape(math.prod(x.shape[:axis]), -1)

    def backward(self, grad: np.ndarray) -> tuple[np.ndarray]:
        return (grad.reshape(self._shape),)


@register_op("Reshape")
class Reshape(Op):
    """`x` in the shape of the constant `shape` input: -1 is inferred, 0 copies the input's size (allowzero=0)."""

    attributes = {"allowzero": 0}

    def forward(self, x: np.ndarray, shape: np.ndarray) -> np.ndarray:
        self._shape = x.shape
        target = [int(d) for d in np.asarray(shape).reshape(-1)]
        if not self.attrs["allowzero"]:
            target = [x.shape[i] if d == 0 else d for i, d in enumerate(target)]
        return x.reshape(target)

    def backward(self, grad: np.ndarray) -> tuple[np.ndarray, None]:
        return grad.reshape(self._shape), None


@register_op("Identity")
class Identity(Op):
    """Pass-through."""

    identity_at_inference = True

    def forward(self, x: np.ndarray) -> np.ndarray:
        return x

    def backward(self, grad: np.ndarray) -> tuple[np.ndarray]:
        return (grad,)
