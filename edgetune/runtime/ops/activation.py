"""Activations applied element by element."""

from __future__ import annotations

import numpy as np

from edgetune.runtime.ops.base import Op, register_op


@register_op("Relu")
class Relu(Op):
    """`max(x, 0)`; NaN stays NaN (as torch), so a diverging run is not hidden."""

    def forward(self, x: np.ndarray) -> np.ndarray:
        self._mask = x > 0
        return np.maximum(x, np.float32(0))

    def backward(self, grad: np.ndarray) -> tuple[np.ndarray]:
        # the gradient passes where the input was positive (0 at 0, as torch)
        return (np.where(self._mask, grad, np.float32(0)),)
