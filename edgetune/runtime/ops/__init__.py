"""Differentiable ops of the trainable part: the registry (`base`) and its entries."""

from edgetune.runtime.ops import conv, elementwise, norm, pool  # noqa: F401  (register their ops)
from edgetune.runtime.ops.base import OPS, Op, Parameter, UnknownOp, get_op, register_op

__all__ = ["OPS", "Op", "Parameter", "UnknownOp", "get_op", "register_op"]
