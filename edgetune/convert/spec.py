"""Plain data shared by export (host) and convert: the optimizer and loss tables, preprocessing presets.

Torch-free and onnx-free on purpose: `edgetune convert --backbone-onnx` builds a model with an
optimizer and a preprocessing preset but never imports torch, and the CLI builds its parsers from
here. The optimizers (`SGD`, `Adam`, ...) and losses are the runtime's own entries, defined once in
`edgetune.runtime.optim` and `edgetune.runtime.ops.loss`; each turns into the JSON `meta` holds
(docs/FORMAT.md), which is what the device reads.
"""

from __future__ import annotations

from typing import Any

from edgetune.errors import UserError
from edgetune.runtime.ops.loss import LOSSES
from edgetune.runtime.optim import OPTIMIZERS, SGD, Adam, Algorithm

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "LOSSES", "METADATA_KEY", "OPTIMIZERS", "PREPROCESSING_PRESETS", "SGD",
           "Adam", "Algorithm", "check_loss", "optimizer_slots", "preprocessing"]

METADATA_KEY = "edgetune"  # the training graph's metadata_props key holding its JSON metadata

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


# preset name -> (scale, mean, std): a pixel p becomes (p * scale - mean) / std
_PRESETS = {
    "lite0": (1.0, [127.0] * 3, [128.0] * 3),
    "imagenet": (1.0 / 255.0, IMAGENET_MEAN, IMAGENET_STD),
}
PREPROCESSING_PRESETS = tuple(sorted(_PRESETS))


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
        raise UserError(f"unknown loss {loss!r}; known: {', '.join(sorted(LOSSES))}")
    return loss


def optimizer_slots(optimizer_meta: dict[str, Any]) -> tuple[str, ...]:
    """The state tensors (`optim/<param>/<slot>`) an optimizer keeps per parameter."""
    return Algorithm.from_meta(optimizer_meta).slots
