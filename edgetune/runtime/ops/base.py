"""The op table: each differentiable op of the trainable part is one class registered here.

One entry says what an op accepts (its ONNX `op_type` and attributes with their defaults) and how it
runs forward and backward. The converter asks this table whether the device can train a node, the
engine runs the entries, the inference exporter writes them back as ONNX nodes: a new op is one
class plus its tests (tinygrad's `ops.py` + `function.py`, onnx's op schemas).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

if TYPE_CHECKING:
    from edgetune.runtime.workers import Peers


class Parameter:
    """A trainable tensor with its gradient; `name` is the torch name (`head.weight`)."""

    def __init__(self, name: str, data: np.ndarray) -> None:
        self.name = name
        self.data = np.ascontiguousarray(data, dtype=np.float32)
        self.grad = np.zeros_like(self.data)

    def __repr__(self) -> str:
        return f"Parameter({self.name!r}, shape={self.data.shape})"


class UnknownOp(ValueError):
    """An op type the engine cannot run or differentiate."""


class Op:
    """One node of the trainable graph: `forward` keeps what `backward` needs.

    `forward(*inputs)` takes the node's input arrays in ONNX input order (activations, parameters,
    buffers, constants alike) and returns its one output. `backward(grad)` returns one gradient per
    input, in the same order; it may return None for input i when `needs_grad[i]` is False (the
    engine sets that: a constant, a buffer, or the cut tensor nobody differentiates).

    What `forward` keeps for `backward` lives in attributes named `_...` (and only that: settings
    read from the attributes have plain names). `release` drops them; the module calls it once an
    op's backward has run, or right after its forward in eval mode, so only one pass's activations
    are ever alive (a deeper trainable part's tensors are tens of MB each).
    """

    op_type: ClassVar[str] = ""
    attributes: ClassVar[Mapping[str, Any]] = {}  # accepted ONNX attributes and their defaults
    identity_at_inference: ClassVar[bool] = False  # passes its first input through in eval mode (Dropout):
    # the inference export leaves such a node out
    mixes_samples: bool = False  # a sample's output depends on the other samples of the batch (batch statistics)
    peers: Peers | None = None  # set by the module while a batch runs as passes on several threads, for an op that
    # mixes samples: `peers.sum(a)` adds `a` over the batch's passes
    draws_random: ClassVar[bool] = False  # forward reads `rng` in train mode (dropout): passes must run in order
    training: bool = True
    rng: np.random.Generator | None = None  # set by the module: the one generator random ops draw from

    def __init__(self, **attrs: Any) -> None:
        unknown = sorted(set(attrs) - set(self.attributes))
        if unknown:
            raise UnknownOp(f"{self.op_type}: unsupported attributes {unknown}; accepted: {sorted(self.attributes)}")
        self.attrs = {**self.attributes, **attrs}
        self.needs_grad: tuple[bool, ...] = ()

    def forward(self, *inputs: np.ndarray) -> np.ndarray:  # pragma: no cover - every op overrides it
        raise NotImplementedError

    def backward(self, grad: np.ndarray) -> tuple[np.ndarray | None, ...]:  # pragma: no cover - idem
        raise NotImplementedError

    def release(self) -> None:
        """Forget what the last `forward` kept for `backward` (its `_...` attributes)."""
        for name in [name for name in vars(self) if name.startswith("_")]:
            delattr(self, name)

    def __repr__(self) -> str:
        changed = {k: v for k, v in self.attrs.items() if self.attributes.get(k) != v}
        return f"{self.op_type}({', '.join(f'{k}={v!r}' for k, v in changed.items())})"


OPS: dict[str, type[Op]] = {}


def register_op(op_type: str) -> Callable[[type[Op]], type[Op]]:
    """Class decorator: enter an `Op` subclass in `OPS` under its ONNX op type."""

    def enter(cls: type[Op]) -> type[Op]:
        if op_type in OPS:
            raise ValueError(f"op {op_type} is registered twice ({OPS[op_type].__name__}, {cls.__name__})")
        cls.op_type = op_type
        OPS[op_type] = cls
        return cls

    return enter


def get_op(op_type: str) -> type[Op]:
    """The registered class of `op_type`; `UnknownOp` listing the known ones otherwise."""
    try:
        return OPS[op_type]
    except KeyError:
        raise UnknownOp(f"op {op_type!r} cannot be trained on the device; known: {', '.join(sorted(OPS))}") from None
