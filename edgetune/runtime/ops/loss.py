"""The losses, by the name `meta["loss"]` gives (docs/FORMAT.md); the converter accepts exactly these."""

from __future__ import annotations

import numpy as np

from edgetune.runtime.ops.base import Op


class SoftmaxCrossEntropy(Op):
    """Mean softmax cross-entropy over the batch, with float (one-hot or soft) labels, as the seed's loss.

    `forward(logits, labels)` returns the scalar loss; `backward(grad)` returns d(grad * loss)/d logits
    = grad * (softmax - labels) / B, and None for the labels. Because the loss is a mean over the B
    samples of a batch, K batches whose gradients are summed must each be scaled by `grad` = 1/K to
    give the gradient of the mean over all K*B samples (what `Module(..., grad_scale=1/K)` does).
    """

    op_type = "SoftmaxCrossEntropy"

    def forward(self, logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_z = np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        log_p = shifted - log_z
        self._p, self._labels = np.exp(log_p), labels
        return np.float32(-(labels * log_p).sum(axis=1).mean(dtype=np.float32))

    def backward(self, grad: float = 1.0) -> tuple[np.ndarray, None]:
        # d/dz of -sum(y log softmax(z)) = softmax(z) * sum(y) - y; mean over the batch divides by B
        n = self._labels.shape[0]
        dz = (self._p * self._labels.sum(axis=1, keepdims=True) - self._labels) / np.float32(n)
        return (dz if grad == 1.0 else dz * np.float32(grad)), None


LOSSES: dict[str, type[Op]] = {"softmax_cross_entropy": SoftmaxCrossEntropy}


def get_loss(name: str) -> Op:
    """A new instance of the loss `name`; `ValueError` listing the known ones otherwise."""
    if not isinstance(name, str) or name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known: {', '.join(sorted(LOSSES))}")
    return LOSSES[name]()
