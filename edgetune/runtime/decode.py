"""Decoding: an image file's bytes to RGB pixels, with the numpy BMP reader or, for anything else, Pillow.

BMPs, what `edgetune prepare-data` writes, are read by the numpy-only `edgetune.runtime.bmp` (as
the seed's device code reads its BMPs itself), so the device needs no image library. Pillow is
imported only for other formats (PNG, JPEG, ...) and BMP kinds that reader does not handle; without
it such a file raises `BadImage` with a reason that says `pip install pillow`, and the loader skips
it at load time. Images that claim more than `MAX_PIXELS` pixels (decompression bombs) are refused.
"""

from __future__ import annotations

import io
import os
import warnings
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

from edgetune.runtime.bmp import BmpError, BmpUnsupported, decode_bmp
from edgetune.runtime.bounds import MAX_IMAGE_BYTES
from edgetune.runtime.safe_read import UnsafeFile, read_file

if TYPE_CHECKING:
    from PIL import Image

MAX_PIXELS = 64 * 1024 * 1024  # refuse images over 64 Mpx: any real photo fits, a bomb does not


class BadImage(Exception):
    """A file that cannot be used as an image; the message is the reason shown to the user."""


def pillow() -> ModuleType:
    """`PIL.Image`, imported on first need: the device decodes its BMPs without it.

    Raises:
        BadImage: Pillow is not installed (the file needing it is skipped, with this reason).
    """
    try:
        from PIL import Image
    except ImportError:
        raise BadImage("needs Pillow (not installed) to decode or resize it: "
                       "pip install pillow (or edgetune[images])") from None
    return Image


def read_bytes(data: bytes | str | os.PathLike, root: str | os.PathLike | None = None) -> bytes:
    """The file's bytes (`data` itself when already bytes); `BadImage` if unreadable, refused or empty.

    A path is read by `safe_read.read_file`: a regular file of at most `MAX_IMAGE_BYTES`, inside
    `root` once links are resolved (when given), opened so that nothing can block.
    """
    if not isinstance(data, bytes):
        try:
            data = read_file(data, max_bytes=MAX_IMAGE_BYTES, root=root)
        except UnsafeFile as e:
            raise BadImage(e.reason) from None
        except OSError as e:
            raise BadImage(f"unreadable ({e.strerror or e})") from e
    if not data:
        raise BadImage("empty file")
    return data


def decode_image(data: bytes | str | os.PathLike) -> np.ndarray:
    """Decode one image to RGB pixels: BMPs with the numpy reader, anything else with Pillow.

    Args:
        data: the file's bytes, or its path.

    Returns:
        (height, width, 3) uint8 RGB; for a BMP identical to Pillow's `open_image`.

    Raises:
        BadImage: unreadable, empty, malformed, too large, or not a BMP while Pillow is missing.
    """
    data = read_bytes(data)
    if data[:2] == b"BM":
        try:
            return decode_bmp(data, MAX_PIXELS)
        except BmpUnsupported:
            pass  # a valid BMP kind the reader skips (RLE, 16-bit, ...): Pillow's
        except BmpError as e:
            raise BadImage(str(e)) from None
    return np.asarray(open_image(data))


def open_image(data: bytes | str | os.PathLike) -> Image.Image:
    """Open, check and fully decode one image as 3-channel RGB.

    Decompression bombs are refused before decoding: the pixel count from the header is checked
    against `MAX_PIXELS`, and Pillow's own `DecompressionBombWarning` is raised as an error.
    Grey, palette, CMYK and alpha images become RGB the way torchvision's ImageFolder loader does
    (`convert("RGB")`, alpha dropped), so prepared data matches what the usual pipeline sees;
    16-bit grey is scaled to 8 bits first (`to_rgb`), where that loader clips it to white.

    Args:
        data: the file's bytes, or its path.

    Returns:
        The decoded RGB image.

    Raises:
        BadImage: empty, truncated, not an image, or too large.
    """
    data = read_bytes(data)
    pil = pillow()
    with warnings.catch_warnings():
        warnings.simplefilter("error", pil.DecompressionBombWarning)
        warnings.simplefilter("ignore", UserWarning)  # "palette images with transparency" etc.
        try:
            with pil.open(io.BytesIO(data)) as probe:
                check_size(probe.size)
                probe.verify()
            img = pil.open(io.BytesIO(data))
            img.load()
            return img if img.mode == "RGB" else to_rgb(img)
        except (pil.DecompressionBombError, pil.DecompressionBombWarning) as e:
            raise BadImage(f"refused: decompression bomb ({e})") from e
        except BadImage:
            raise
        except pil.UnidentifiedImageError as e:
            raise BadImage("not an image") from e
        except Exception as e:  # Pillow's decoders raise many types on corrupt data (OSError, SyntaxError,
            # struct.error, ValueError, ...): each means the same, this file cannot be used
            raise BadImage(f"corrupt or truncated ({type(e).__name__}: {e})") from e


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a decoded image of any mode to 8-bit RGB.

    16-bit grey (PNG, TIFF: modes `I;16*`, and `I`, which Pillow also uses for them) is scaled down
    to 8 bits (`>> 8`) first: Pillow's own `convert("RGB")` clips those values at 255, so a
    16-bit photo would come out as flat white. Values of a 32-bit `I` image outside 0..65535 are
    clipped to that range (no camera makes them).
    """
    if img.mode.startswith("I;16") or img.mode == "I":
        pixels = np.clip(np.asarray(img, dtype=np.int64), 0, 65535) >> 8
        img = pillow().fromarray(pixels.astype(np.uint8), "L")
    return img.convert("RGB")


def check_size(size: tuple[int, int]) -> None:
    """Raise `BadImage` for an image whose header claims more than `MAX_PIXELS` pixels."""
    width, height = size
    if width * height > MAX_PIXELS:
        raise BadImage(f"refused: {width}x{height} pixels is over the {MAX_PIXELS} limit (decompression bomb?)")
