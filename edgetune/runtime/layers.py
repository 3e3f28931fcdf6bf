"""The trainable head in numpy: one class per op, `forward` and `backward` side by side.

Every layer caches what its backward needs during `forward` and returns the gradient with respect
to its input from `backward`, accumulating parameter gradients into `Parameter.grad` (so a layer
is reusable for any batch size). Why numpy and not onnxruntime-training: the head is a handful of
small matrices, a numpy step costs microseconds and needs no training build of onnxruntime.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from edgetune.runtime.ops.base import Parameter


class Layer:
    """Base of every head op: `parameters()`, `zero_grad()`, `__call__` (= forward)."""

    training = True

    def parameters(self) -> list[Parameter]:
        """The layer's trainable tensors (none for parameter-free ops)."""
        return []

    def zero_grad(self) -> None:
        """Reset the accumulated gradients before the next backward pass."""
        for p in self.parameters():
            p.grad[...] = 0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.forward(x)

    def forward(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover - every op overrides it
        raise NotImplementedError

    def backward(self, grad: np.ndarray) -> np.ndarray:  # pragma: no cover - every op overrides it
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Dense(Layer):
    """`y = x W^T + b` with W of shape (out, in) as `torch.nn.Linear`; `bias` may be None."""

    def __init__(self, weight: Parameter, bias: Parameter | None = None) -> None:
        if weight.data.ndim != 2:
            raise ValueError(f"dense weight {weight.name} must be 2-D (out, in), got shape {weight.data.shape}")
        if bias is not None and bias.data.shape != weight.data.shape[:1]:
            raise ValueError(f"dense bias {bias.name} has shape {bias.data.shape}, expected {weight.data.shape[:1]}")
        self.weight, self.bias = weight, bias
        self._x: np.ndarray | None = None

    def parameters(self) -> list[Parameter]:
        return [self.weight] + ([self.bias] if self.bias is not None else [])

    def forward(self, x: np.ndarray) -> np.ndarray:
        self._x = x
        y = x @ self.weight.data.T
        return y + self.bias.data if self.bias is not None else y

    def backward(self, grad: np.ndarray) -> np.ndarray:
        # dW = g^T x, db = sum_batch g, dx = g W
        self.weight.grad += grad.T @ self._x
        if self.bias is not None:
            self.bias.grad += grad.sum(axis=0)
        return grad @ self.weight.data

    def __repr__(self) -> str:
        out, inp = self.weight.data.shape
        return f"Dense({inp} -> {out}, bias={self.bias is not None})"


class ReLU(Layer):
    """`max(x, 0)`."""

    def forward(self, x: np.ndarray) -> np.ndarray:
        self._mask = x > 0
        return np.maximum(x, np.float32(0))  # NaN stays NaN (as torch), so divergence is not hidden

    def backward(self, grad: np.ndarray) -> np.ndarray:
        # the gradient passes where the input was positive (0 at 0, as torch)
        return np.where(self._mask, grad, np.float32(0))


class Dropout(Layer):
    """Inverted dropout as `torch.nn.Dropout`: keep with probability 1-p, scale by 1/(1-p); identity in eval.

    The mask comes from `rng`, a numpy Generator owned by the session, so its state can be saved
    in a checkpoint and a resumed run draws the same masks.
    """

    def __init__(self, p: float, rng: np.random.Generator) -> None:
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout p must be in [0, 1), got {p}")
        self.p, self.rng = float(p), rng
        self._mask: np.ndarray | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        if not self.training or self.p == 0.0:
            self._mask = None
            return x
        keep = self.rng.random(x.shape, dtype=np.float32) >= np.float32(self.p)
        self._mask = keep.astype(np.float32) * np.float32(1.0 / (1.0 - self.p))
        return x * self._mask

    def backward(self, grad: np.ndarray) -> np.ndarray:
        return grad if self._mask is None else grad * self._mask

    def __repr__(self) -> str:
        return f"Dropout(p={self.p})"


class Flatten(Layer):
    """Collapse every axis after the batch axis (`torch.nn.Flatten()`)."""

    def forward(self, x: np.ndarray) -> np.ndarray:
        self._shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, grad: np.ndarray) -> np.ndarray:
        return grad.reshape(self._shape)


class Identity(Layer):
    """Pass-through (a head slot with no op)."""

    def forward(self, x: np.ndarray) -> np.ndarray:
        return x

    def backward(self, grad: np.ndarray) -> np.ndarray:
        return grad


class SoftmaxCrossEntropy:
    """Mean softmax cross-entropy with logits and float (one-hot or soft) labels, as the seed's loss.

    `forward` returns the scalar loss; `backward` returns d loss / d logits = (softmax - labels) / B.
    """

    def forward(self, logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_z = np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        log_p = shifted - log_z
        self._p, self._labels = np.exp(log_p), labels
        return np.float32(-(labels * log_p).sum(axis=1).mean(dtype=np.float32))

    def backward(self) -> np.ndarray:
        # d/dz of -sum(y log softmax(z)) = softmax(z) * sum(y) - y; mean over the batch divides by B
        n = self._labels.shape[0]
        return (self._p * self._labels.sum(axis=1, keepdims=True) - self._labels) / np.float32(n)


class Sequential(Layer):
    """The head: layers applied in order, backward in reverse."""

    def __init__(self, layers: Sequence[Layer]) -> None:
        self.layers = list(layers)

    def parameters(self) -> list[Parameter]:
        return [p for layer in self.layers for p in layer.parameters()]

    def train(self, mode: bool = True) -> None:
        """Switch dropout on (train) or off (eval)."""
        for layer in self.layers:
            layer.training = mode

    def forward(self, x: np.ndarray) -> np.ndarray:
        for layer in self.layers:
            x = layer(x)
        return x

    def backward(self, grad: np.ndarray) -> np.ndarray:
        for layer in reversed(self.layers):
            grad = layer.backward(grad)
        return grad

    def __repr__(self) -> str:
        return "Sequential(" + ", ".join(map(repr, self.layers)) + ")"


def build_head(spec: Sequence[Mapping[str, Any]], params: Mapping[str, Parameter],
               rng: np.random.Generator) -> Sequential:
    """Build the head from a model's `meta["head"]` list (docs/FORMAT.md).

    Args:
        spec: the ops in order, e.g. `[{"op": "dense", "weight": "head.weight", "bias": "head.bias"}]`.
        params: the model's trainable tensors by torch name.
        rng: the generator dropout draws its masks from.

    Raises:
        ValueError: an unknown op or a parameter the model does not have.
    """
    layers: list[Layer] = []
    for i, item in enumerate(spec):
        op = item.get("op") if isinstance(item, Mapping) else None
        if op == "dense":
            missing = [n for n in (item.get("weight"), item.get("bias")) if n is not None and n not in params]
            if item.get("weight") is None or missing:
                raise ValueError(f"head op {i} (dense) names parameters the model does not have: "
                                 f"{missing or ['weight']}")
            bias = params[item["bias"]] if item.get("bias") is not None else None
            layers.append(Dense(params[item["weight"]], bias))
        elif op == "dropout":
            layers.append(Dropout(float(item.get("p", 0.5)), rng))
        elif op in _SIMPLE:
            layers.append(_SIMPLE[op]())
        else:
            raise ValueError(f"head op {i}: unknown op {op!r}; known: {sorted(['dense', 'dropout', *_SIMPLE])}")
    return Sequential(layers)


_SIMPLE: dict[str, type[Layer]] = {"relu": ReLU, "flatten": Flatten, "identity": Identity}
