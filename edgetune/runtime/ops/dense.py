"""Matrix products: `Gemm` (how a linear layer is written in ONNX) and `MatMul`."""

from __future__ import annotations

import numpy as np

from edgetune.runtime.ops.base import Op, UnknownOp, register_op


@register_op("Gemm")
class Gemm(Op):
    """`Y = A B + C`, B transposed when `transB` (torch.nn.Linear: W is (out, in), transB=1); C optional.

    C is broadcast to Y (a bias of shape (out,) is added to every row). Only `alpha = beta = 1`
    and `transA = 0`, what linear layers export, are implemented.
    """

    attributes = {"alpha": 1.0, "beta": 1.0, "transA": 0, "transB": 0}

    def __init__(self, **attrs: object) -> None:
        super().__init__(**attrs)
        alpha, beta, trans_a = self.attrs["alpha"], self.attrs["beta"], self.attrs["transA"]
        if alpha != 1.0 or beta != 1.0 or trans_a != 0:
            raise UnknownOp(f"only alpha=1, beta=1, transA=0 is supported, got alpha={alpha} beta={beta} "
                            f"transA={trans_a}")

    def forward(self, a: np.ndarray, b: np.ndarray, c: np.ndarray | None = None) -> np.ndarray:
        self._a, self._b, self._c_shape = a, b, None if c is None else c.shape
        y = a @ (b.T if self.attrs["transB"] else b)
        return y + c if c is not None else y

    def backward(self, grad: np.ndarray) -> tuple[np.ndarray | None, ...]:
        # dA = G B^T (B as used), dB = A^T G (transposed back when transB), dC = G summed over broadcast axes
        need = self.needs_grad or (True, True, True)
        trans_b = self.attrs["transB"]
        da = (grad @ self._b if trans_b else grad @ self._b.T) if need[0] else None
        db = (grad.T @ self._a if trans_b else self._a.T @ grad) if need[1] else None
        dc = _sum_to_shape(grad, self._c_shape) if self._c_shape is not None and need[2] else None
        return da, db, dc


@register_op("MatMul")
class MatMul(Op):
    """`Y = A B` for 2-D A (N, in) and B (in, out): a linear layer without bias, as some exporters write it."""

    def forward(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        self._a, self._b = a, b
        return a @ b

    def backward(self, grad: np.ndarray) -> tuple[np.ndarray | None, ...]:
        # dA = G B^T, dB = A^T G
        need = self.needs_grad or (True, True)
        return (grad @ self._b.T if need[0] else None), (self._a.T @ grad if need[1] else None)


def _sum_to_shape(grad: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Sum `grad` over the axes numpy broadcast a tensor of `shape` along (the gradient of a broadcast)."""
    while grad.ndim > len(shape):
        grad = grad.sum(axis=0)
    for axis, size in enumerate(shape):
        if size == 1 and grad.shape[axis] != 1:
            grad = grad.sum(axis=axis, keepdims=True)
    return grad
