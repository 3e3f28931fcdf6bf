"""Normalization: 8-bit RGB pixels to the model's float input, as its `meta["preprocessing"]` says.

A pixel `p` of channel `c` becomes `(p * scale - mean[c]) / std[c]`, laid out (3, H, W) (docs/FORMAT.md
`preprocessing`). `check_preprocessing` refuses, before any image is read, a `preprocessing` object
this runtime cannot honour: the model check at load (`meta.py`) and the dataset loader both use it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgetune.errors import UserError


def check_preprocessing(preprocessing: dict[str, Any]) -> None:
    """Refuse a `preprocessing` dict this runtime cannot honour, before any image is read.

    Raises:
        UserError: another layout or channel order, an unknown crop, a bad size, mean or std.
    """
    try:
        if preprocessing.get("layout", "NCHW") != "NCHW" or preprocessing.get("channels", "RGB") != "RGB":
            raise UserError(f"only NCHW RGB input is supported, the model asks for "
                            f"{preprocessing.get('layout')} {preprocessing.get('channels')}")
        if preprocessing.get("crop", "center") not in ("center", None):
            raise UserError(f"unknown crop {preprocessing['crop']!r} (known: center)")
        size = [int(v) for v in preprocessing["size"]]
        if len(size) != 2 or min(size) <= 0 or len(preprocessing["mean"]) != 3 or len(preprocessing["std"]) != 3:
            raise UserError(f"bad preprocessing size/mean/std: {preprocessing}")
        if any(float(s) == 0 for s in preprocessing["std"]):
            raise UserError("preprocessing std must not be 0")
    except (KeyError, TypeError, ValueError) as e:  # a missing key or a non-number in the model's JSON
        raise UserError(f"bad preprocessing metadata ({e!r}): {preprocessing}") from None


def normalize(pixels: np.ndarray, preprocessing: dict[str, Any]) -> np.ndarray:
    """(H, W, 3) uint8 RGB pixels to the (3, H, W) float32 model input."""
    lut = normalize_table(preprocessing)
    return np.stack([lut[c][pixels[..., c]] for c in range(3)])


def normalize_table(preprocessing: dict[str, Any]) -> np.ndarray:
    """(3, 256) float32: `(p * scale - mean[c]) / std[c]` for every 8-bit value `p`.

    A lookup gives the same float32 numbers as computing each pixel (the same operations on the
    same inputs) at a third of the cost, which matters when every image of a dataset is decoded.
    """
    scale = np.float32(preprocessing.get("scale", 1.0))
    mean = np.asarray(preprocessing["mean"], np.float32).reshape(3, 1)
    std = np.asarray(preprocessing["std"], np.float32).reshape(3, 1)
    return (np.arange(256, dtype=np.float32) * scale - mean) / std
