"""`Dropout`: random zeroing in training, identity in evaluation."""

from __future__ import annotations

import numpy as np

from edgetune.runtime.ops.base import Op, register_op


@register_op("Dropout")
class Dropout(Op):
    """Inverted dropout as `torch.nn.Dropout`: keep with probability 1-p, scale by 1/(1-p); identity in eval.

    Inputs as ONNX's: the data, the ratio p (a constant; 0.5 when absent) and `training_mode`, which
    is ignored: the module's train/eval mode decides. The mask comes from `rng`, the module's
    generator, so its state can be saved in a checkpoint and a resumed run draws the same masks.
    """

    identity_at_inference = True
    draws_random = True

    def forward(self, x: np.ndarray, ratio: np.ndarray | None = None,
                training_mode: np.ndarray | None = None) -> np.ndarray:
        p = 0.5 if ratio is None else float(ratio)
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout ratio must be in [0, 1), got {p}")
        if not self.training or p == 0.0:
            self._mask = None
            return x
        keep = self.rng.random(x.shape, dtype=np.float32) >= np.float32(p)
        self._mask = keep.astype(np.float32) * np.float32(1.0 / (1.0 - p))
        return x * self._mask

    def backward(self, grad: np.ndarray) -> tuple[np.ndarray, None, None]:
        return (grad if self._mask is None else grad * self._mask), None, None
