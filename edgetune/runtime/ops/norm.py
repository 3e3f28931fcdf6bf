"""ONNX `BatchNormalization` in numpy: frozen running statistics by default, batch statistics on request.

Which statistics normalise is the node's own ONNX attribute `training_mode`, read once when the
graph is built, so the choice travels inside the model:

- `training_mode=0` (the default, and what a backbone exported in eval mode carries): inference BN,
  `y = (x - running_mean) / sqrt(running_var + eps) * scale + B`, with `scale` and `B` trainable
  and the running statistics constant. This is what fine-tuning a pretrained block on a small
  dataset wants (batches of 32 from 10 classes make noisy statistics), and what PyTorch does with
  the module in eval mode.
- `training_mode=1`: while the op trains (`Op.training`), the batch's own mean and variance
  normalise, and the running statistics move towards them with the graph's `momentum` (ONNX's
  convention, the opposite of PyTorch's: `running = running * momentum + batch * (1 - momentum)`;
  a torch momentum of 0.01 is an ONNX momentum of 0.99). In eval mode the running statistics
  normalise, as in PyTorch.

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
        self.batch_statistics = self.mixes_samples = bool(self.attrs["training_mode"])

    def freeze_statistics(self) -> None:
        """Normalise with the running statistics while training too (as `training_mode=0`)."""
        self.batch_statistics = self.mixes_samples = False

    def forward(self, x: np.ndarray, scale: np.ndarray, bias: np.ndarray, mean: np.ndarray,
                var: np.ndarray) -> np.ndarray:
        axes = (0, *range(2, x.ndim))
        shape = (1, -1) + (1,) * (x.ndim - 2)
        eps = np.asarray(self.attrs["epsilon"], dtype=x.dtype)
        self._batch = self.batch_statistics and self.training
        self._axes, self._shape, self._scale = axes, shape, scale
        if not self._batch:  # y = x a + (B - mean a), a = scale / sqrt(var + eps): two passes over x
            self._inv = 1 / np.sqrt(var + eps)
            a = scale * self._inv
            self._x, self._mean = x, mean
            y = x * a.reshape(shape)
            y += (bias - mean * a).reshape(shape)
            return y
        mu, count = self._batch_mean(x, axes)
        centered = x - mu.reshape(shape)
        v, _ = self._batch_mean(centered * centered, axes)
        if self.peers is None or self.peers.index == 0:
            m = np.asarray(self.attrs["momentum"], dtype=mean.dtype)
            mean *= m
            mean += (1 - m) * mu
            var *= m
            var += (1 - m) * v * (count / max(count - 1, 1))
        self._count = count
        self._inv = 1 / np.sqrt(v + eps)
        self._xhat = centered * self._inv.reshape(shape)
        return self._xhat * scale.reshape(shape) + bias.reshape(shape)

    def backward(self, grad: np.ndarray) -> tuple[np.ndarray | None, ...]:
        shape, axes = self._shape, self._axes
        gbias = grad.sum(axis=axes)  # d B = sum g
        if self._batch:
            xhat = self._xhat
            gscale = _channel_dot(grad, xhat)  # d scale = sum g xhat
        else:  # the same sum, with the per-channel factor taken out: one pass fewer, no xhat in memory
            gscale = _channel_dot(grad, self._x - self._mean.reshape(shape)) * self._inv
        gx = None
        if not self.needs_grad or self.needs_grad[0]:
            a = (self._scale * self._inv).reshape(shape)
            if self._batch:  # mean and variance depend on x: dx = a (g - mean(g) - xhat mean(g xhat))
                sum_g, sum_gxhat = (gbias, gscale) if self.peers is None else \
                    np.split(self.peers.sum(np.concatenate([gbias, gscale])), 2)
                count = self._count
                gx = a * (grad - (sum_g / count).reshape(shape) - xhat * (sum_gxhat / count).reshape(shape))
            else:  # the statistics are constants: dx = a g
                gx = grad * a
        return gx, gscale, gbias, None, None

    def _batch_mean(self, a: np.ndarray, axes: tuple[int, ...]) -> tuple[np.ndarray, int]:
        """Per-channel mean of `a` over the batch, and the values per channel it averages: this pass's
        alone, or with every other pass's of a split batch."""
        count = a.size // a.shape[1]
        if self.peers is None:
            return a.mean(axis=axes), count
        sums = self.peers.sum(np.append(a.sum(axis=axes), np.float32(count)))  # counts are exact in float32
        return sums[:-1] / sums[-1], int(sums[-1])


def _channel_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """`sum(a * b)` over every axis but 1 (channels), in one pass without the product in memory."""
    axes = "nc" + "hwdijklm"[:a.ndim - 2]
    return np.einsum(f"{axes},{axes}->c", a, b)
