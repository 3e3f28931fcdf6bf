"""Resize and crop geometry: the shorter side to `resize_shorter`, then the central `size` window.

torchvision's rounding (`int()` for the resized side, `round()` for the crop offsets), so a model
exported from a torchvision pipeline sees the pixels it was trained on. Only the crop window is
ever resized (`resize_and_crop`), so memory stays at the crop's size whatever the image's shape.
Pillow does the resampling: it is imported only when an image is not already at the model's size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgetune.runtime.decode import BadImage, pillow

if TYPE_CHECKING:
    from PIL import Image


def shorter_side_size(size: tuple[int, int], shorter: int) -> tuple[int, int]:
    """(width, height) with the shorter side at `shorter`, aspect ratio kept (torchvision's rounding)."""
    w, h = size
    return (shorter, int(shorter * h / w)) if w <= h else (int(shorter * w / h), shorter)


def center_crop(img: Image.Image, height: int, width: int) -> Image.Image:
    """Cut the central `height` x `width` window (torchvision's offsets: round((size - crop) / 2))."""
    w, h = img.size
    if (w, h) == (width, height):
        return img
    if w < width or h < height:
        raise BadImage(f"{w}x{h} is smaller than the {width}x{height} crop")
    left, top = int(round((w - width) / 2.0)), int(round((h - height) / 2.0))
    return img.crop((left, top, left + width, top + height))


def resize_and_crop(img: Image.Image, shorter: int | None, height: int, width: int,
                    resample: int | None = None) -> Image.Image:
    """Resize the shorter side to `shorter`, then `center_crop(..., height, width)`, resizing only the window.

    The shorter side goes to `shorter` (None: size kept); an image still smaller than the crop has
    its shorter side scaled to cover it instead (`max(height, width)`). Only the crop window is
    computed, through Pillow's `resize(box=...)`: the same filter taps at the same source
    positions as resizing the whole image and cropping (equal within 1 grey level, float
    rounding), but memory is that of the crop. Resizing the whole image first is a memory bomb
    for a strip: 100000x4 pixels (0.4 Mpx) at a 256 shorter side would be 6.4 Gpx. `resample` is a
    Pillow filter; None means bilinear.
    """
    w, h = img.size
    new = shorter_side_size((w, h), shorter) if shorter and min(w, h) != shorter else (w, h)
    if new[0] < width or new[1] < height:
        new = shorter_side_size((w, h), max(height, width))
    if new == (w, h):
        return center_crop(img, height, width)
    left, top = int(round((new[0] - width) / 2.0)), int(round((new[1] - height) / 2.0))
    sx, sy = w / new[0], h / new[1]  # source pixels per resized pixel
    box = (left * sx, top * sy, (left + width) * sx, (top + height) * sy)
    return img.resize((width, height), pillow().BILINEAR if resample is None else resample, box=box)
