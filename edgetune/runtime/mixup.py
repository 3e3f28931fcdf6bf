"""Mixup at the cut: train on convex mixes of two samples' cached features and of their labels.

Fine-tuning the last block on a thousand or two images memorises them early (batch losses below
0.1 within three epochs of Fashion-MNIST's 600-image demo), long before a 30-epoch run ends.
Augmenting images would cost what the cut saves
(the frozen prefix runs once per image, so once per view). Mixing the tensors at the cut costs
nothing: it is Manifold Mixup (Verma et al., 2019) at the cut's layer, mixup (Zhang et al., 2018)
when the cut is the input. Each batch draws one lam ~ Beta(alpha, alpha) and a permutation, and
trains on lam * x + (1 - lam) * x[perm] with targets lam * y + (1 - lam) * y[perm]: the softmax
cross-entropy with those soft targets is lam * CE(y) + (1 - lam) * CE(y[perm]).

The draws of a step come from a generator seeded with (data-order seed, step), so a run resumed
from a checkpoint mixes exactly as the uninterrupted one, with nothing added to the record.
"""

from __future__ import annotations

import numpy as np


def mix(features: np.ndarray, labels: np.ndarray, num_classes: int, alpha: float,
        seed: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    """Mix a batch with a permutation of itself.

    Args:
        features: (B, ...) float32 tensors at the cut.
        labels: (B,) integer class ids.
        num_classes: width of the one-hot targets.
        alpha: the Beta distribution's both parameters (> 0); small alpha draws lam near 0 or 1.
        seed, step: what the draws are seeded with (the run's data-order seed, the optimizer step).

    Returns:
        The mixed features (float32, same shape) and (B, num_classes) float32 soft targets.
    """
    rng = np.random.Generator(np.random.PCG64([seed, step]))
    lam = np.float32(rng.beta(alpha, alpha))
    perm = rng.permutation(len(features))
    targets = np.eye(num_classes, dtype=np.float32)[labels]
    return lam * features + (1 - lam) * features[perm], lam * targets + (1 - lam) * targets[perm]
