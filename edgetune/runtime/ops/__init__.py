"""Differentiable ops of the trainable part: the registry (`base`) and its entries, one module per family."""

from edgetune.runtime.ops import activation, conv, dense, dropout, elementwise, norm, pool, shape  # noqa: F401 - each fills OPS
from edgetune.runtime.ops.base import OPS, Op, Parameter, UnknownOp, get_op, register_op
from edgetune.runtime.ops.loss import LOSSES, get_loss

__all__ = ["LOSSES", "OPS", "Op", "Parameter", "UnknownOp", "get_loss", "get_op", "register_op"]
