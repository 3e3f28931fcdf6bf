"""ONNX `BatchNormalization` in numpy: frozen running statistics by default, batch statistics on request.

Which statistics normalise is the node's own ONNX attribute `training_mode`, read once when the
graph is built, so the choice travels inside the model:

- `training_mode=0` (the default, and what a backbone exported in eval mode carries): inference BN,
  `y = (x - running_mean) / sqrt(running_var + eps) * scale + B`, with `scale` and `B` trainable
  and the running statistics constant: what PyTorch does with the module in eval mode, and what
  `last-stage`'s recipe trains with.
- `training_mode=1`: while the op trains (`Op.training`), the batch's own mean and variance
  normalise, and the running statistics move towards them with the graph's `momentum` (ONNX's
  convention, the opposite of PyTorch's: `running = running * momentum + batch * (1 - momentum)`;
  a torch momentum of 0.01 is an ONNX momentum of 0.99). In eval mode the running statistics
  normalise, as in PyTorch. `last-block`'s recipe trains so: ImageNet's statistics do not fit the
  cut tensors of images far from it (bench/RESULTS.md).

The running statistics are buffers: inputs 3 and 4 (`input_mean`, `input_var`), never trained,
updated in place by `forward` in batch mode (the engine hands the op its own buffer arrays). The
variance that updates `input_var` is the unbiased one (n / (n - 1)), as PyTorch's, because the
graph comes from PyTorch and its training is the reference; the ONNX reference implementation uses
the biased one. Normalisation itself uses the biased variance, as both do.

A batch the engine splits into passes on several threads is still one batch here: each pass sums
its part of the statistics (and in backward of the two gradient sums they need) and meets the other
passes (`Op.peers`) to add them up, as PyTorch's SyncBatchNorm does across devices; the running
statistics move once per batch, by the first pass.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgetune.runtime.ops.base import Op, UnknownOp, register_op


@register_op("BatchNormalization")
class BatchNormalization(Op):
    """`y = (x - mean) / sqrt(var + epsilon) * scale + B` per channel (axis 1) of an (N, C, ...) input."""

    attributes = {"epsilon": 1e-5, "momentum": 0.9, "training_mode": 0}

    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        if self.attrs["training_mode"] not in (0, 1):
            raise UnknownOp(f"BatchNormalization: training_mode must be 0 or 1, got {self.attrs['training_mode']}")
        self.batch_statistics = bool(self.attrs["training_mode"])

    @property
    def mixes_samples(self) -> bool:  # type: ignore[override]
        """Batch statistics tie each sample's output to the batch's other samples (see `Op.mixes_samples`)."""
        return self.batch_statistics

    def freeze_statistics(self) -> None:
        """Normalise with the running statistics while training too (as `training_mode=0`)."""
        self.batch_statistics = False

    def forward(self, x: np.ndarray, scale: np.ndarray, bias: np.ndarray, mean: np.ndarray,
                var: np.ndarray) -> np.ndarray:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        eps = np.asarray(self.attrs["epsilon"], dtype=x.dtype)
        self._batch = self.batch_statistics and self.training
        self._shape, self._scale = shape, scale
        if not self._batch:  # y = x a + (B - mean a), a = scale / sqrt(var + eps): two passes over x
            self._inv = 1 / np.sqrt(var + eps)
            a = scale * self._inv
            self._x, self._mean = x, mean
            y = x * a.reshape(shape)
            y += (bias - mean * a).reshape(shape)
            return y
        sum_x, count = self._batch_sum(_channel_sum(x), x)
        mu = sum_x / count
        centered = x - mu.reshape(shape)
        v = self._peer_sum(_channel_dot(centered, centered)) / count  # two-pass: no E[x^2] - mu^2 cancellation
        if self.peers is None or self.peers.index == 0:
            m = np.asarray(self.attrs["momentum"], dtype=mean.dtype)
            mean *= m
            mean += (1 - m) * mu
            var *= m
            var += (1 - m) * v * (count / max(count - 1, 1))
        self._count, self._centered = count, centered  # xhat = centered * inv, never stored
        self._inv = 1 / np.sqrt(v + eps)
        y = centered * (scale * self._inv).reshape(shape)
        y += bias.reshape(shape)
        return y

    def backward(self, grad: np.ndarray) -> tuple[np.ndarray | None, ...]:
        shape, inv = self._shape, self._inv
        gbias = _channel_sum(grad)  # d B = sum g
        # d scale = sum g xhat = inv sum g (x - mean): the per-channel factor taken out, no xhat in memory
        gscale = _channel_dot(grad, self._centered if self._batch else self._x - self._mean.reshape(shape)) * inv
        gx = None
        if not self.needs_grad or self.needs_grad[0]:
            a = self._scale * inv
            gx = grad * a.reshape(shape)  # the statistics are constants: dx = a g
            if self._batch:  # they depend on x: dx = a (g - sum(g) / n - xhat sum(g xhat) / n), sums over the batch
                sum_g, sum_gxhat = np.split(self._peer_sum(np.concatenate([gbias, gscale])), 2)
                gx -= (a * sum_g / self._count).reshape(shape)
                centered = self._centered  # released after this backward: scaled in place
                centered *= (a * inv * sum_gxhat / self._count).reshape(shape)
                gx -= centered
        return gx, gscale, gbias, None, None

    def _batch_sum(self, sums: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, int]:
        """Per-channel `sums` over this pass of `x` made the whole batch's, as `_peer_sum` does, and how many
        values per channel they add up, sent with them (once per forward: the second sum reuses it)."""
        count = x.size // x.shape[1]
        if self.peers is None:
            return sums, count
        total = self.peers.sum(np.append(sums, np.asarray(count, sums.dtype)))  # counts are exact in float32
        return total[:-1], int(total[-1])

    def _peer_sum(self, sums: np.ndarray) -> np.ndarray:
        """`sums` over this pass alone, or added to every other pass's of a split batch (`Op.peers`)."""
        return sums if self.peers is None else self.peers.sum(sums)


def _channel_sum(a: np.ndarray) -> np.ndarray:
    """`sum(a)` over every axis but 1 (channels); einsum, 4x faster than `a.sum(axis=(0, 2, 3))` here."""
    return np.einsum(f"{_axes(a)}->c", a)


def _channel_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """`sum(a * b)` over every axis but 1 (channels), in one pass without the product in memory."""
    axes = _axes(a)
    return np.einsum(f"{axes},{axes}->c", a, b)


def _axes(a: np.ndarray) -> str:
    """einsum's subscripts for an (N, C, ...) array: `nc` and one letter per spatial axis."""
    return "nc" + "hwdijklm"[:a.ndim - 2]
