"""Plain-data specs shared by export (host) and convert: optimizers, losses, preprocessing presets.

Torch-free on purpose: `edgetune convert --backbone-onnx` builds a model with an optimizer and a
preprocessing preset but never imports torch. Each spec turns into the JSON that `meta` holds
(docs/FORMAT.md), which is what the device reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgetune.errors import UserError

LOSSES = ("softmax_cross_entropy",)
METADATA_KEY = "edgetune"  # the training graph's metadata_props key holding its JSON metadata

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


@dataclass(frozen=True)
class SGD:
    """Stochastic gradient descent with momentum, PyTorch semantics (the seed's optimizer)."""

    lr: float = 0.0015
    momentum: float = 0.9
    dampening: float = 0.01
    weight_decay: float = 0.0
    nesterov: bool = False

    slots = ("momentum_buffer",)

    def to_meta(self) -> dict[str, Any]:
        """The `meta.optimizer` object."""
        _check_positive("lr", self.lr)
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise UserError("nesterov momentum needs momentum > 0 and dampening 0 (PyTorch rule)")
        return {"name": "sgd", "lr": float(self.lr), "momentum": float(self.momentum),
                "dampening": float(self.dampening), "weight_decay": float(self.weight_decay),
                "nesterov": bool(self.nesterov)}


@dataclass(frozen=True)
class Adam:
    """Adam, PyTorch semantics (L2 weight decay added to the gradient)."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0

    slots = ("exp_avg", "exp_avg_sq")

    def to_meta(self) -> dict[str, Any]:
        """The `meta.optimizer` object."""
        _check_positive("lr", self.lr)
        _check_positive("eps", self.eps)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise UserError(f"Adam betas must be two numbers in [0, 1), got {self.betas}")
        return {"name": "adam", "lr": float(self.lr), "betas": [float(b) for b in self.betas],
                "eps": float(self.eps), "weight_decay": float(self.weight_decay)}


# preset name -> (scale, mean, std): a pixel p becomes (p * scale - mean) / std
_PRESETS = {
    "lite0": (1.0, [127.0] * 3, [128.0] * 3),
    "imagenet": (1.0 / 255.0, IMAGENET_MEAN, IMAGENET_STD),
}
PREPROCESSING_PRESETS = tuple(sorted(_PRESETS))

OPTIMIZERS: dict[str, type[SGD] | type[Adam]] = {"sgd": SGD, "adam": Adam}


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise UserError(f"optimizer {name} must be > 0, got {value}")


def preprocessing(name: str, size: tuple[int, int] = (224, 224)) -> dict[str, Any]:
    """A named preprocessing preset as the `meta.preprocessing` object.

    Args:
        name: `lite0` (pixels (p - 127) / 128, EfficientNet-Lite) or `imagenet` (p / 255 then
            ImageNet mean/std, the seed's B0).
        size: the network's input `(H, W)`; the shorter side is first resized to 256/224 of it.

    Returns:
        A fresh dict (callers may change it).
    """
    if name not in _PRESETS:
        raise UserError(f"unknown preprocessing {name!r}; known: {', '.join(PREPROCESSING_PRESETS)}")
    scale, mean, std = _PRESETS[name]
    return {"resize_shorter": round(min(size) * 256 / 224), "crop": "center", "size": [int(size[0]), int(size[1])],
            "layout": "NCHW", "channels": "RGB", "scale": scale, "mean": list(mean), "std": list(std)}



def check_loss(loss: str) -> str:
    """Reject losses the runtime does not implement, naming the ones it does."""
    if loss not in LOSSES:
        raise UserError(f"unknown loss {loss!r}; known: {', '.join(LOSSES)}")
    return loss


def optimizer_slots(optimizer_meta: dict[str, Any]) -> tuple[str, ...]:
    """The state tensors (`optim/<param>/<slot>`) an optimizer keeps per parameter."""
    return OPTIMIZERS[optimizer_meta["name"]].slots
