"""A small, strict BMP reader in numpy: the device decodes its prepared dataset without Pillow.

The seed's device code (MindSpore's dataset.cc) reads its 24-bit BMPs itself, with no image
library; this does the same, so Pillow (~22 MB) is not part of the device install. Handled: the
`BM` file header, BITMAPINFOHEADER and its later versions (40, 52, 56, 108, 124 bytes), 24-bit and
32-bit BI_RGB, 24/32-bit BI_BITFIELDS with the standard masks (alpha dropped, as Pillow's
`convert("RGB")` does), 8-bit palette images, bottom-up and top-down rows, rows padded to 4 bytes.

Every size is checked against the file length before anything is allocated, so a header that lies
costs nothing. A malformed file raises `BmpError`; a valid BMP of a kind not handled here (RLE,
1/4/16-bit, OS/2 headers, other masks) raises `BmpUnsupported`, and the caller may hand it to Pillow.
"""

from __future__ import annotations

import struct

import numpy as np

FILE_HEADER = 14
INFO_HEADERS = (40, 52, 56, 108, 124)  # BITMAPINFOHEADER, V2, V3, V4, V5
BI_RGB, BI_BITFIELDS = 0, 3
STANDARD_MASKS = (0xFF0000, 0xFF00, 0xFF)  # R, G, B: bytes stored B, G, R(, X)


class BmpError(ValueError):
    """A malformed BMP file; the message is the reason shown to the user."""


class BmpUnsupported(BmpError):
    """A BMP of a valid kind this reader does not handle (another decoder may)."""


def decode_bmp(data: bytes, max_pixels: int) -> np.ndarray:
    """Decode a BMP file's bytes to RGB pixels.

    Args:
        data: the whole file.
        max_pixels: refuse images whose header claims more pixels than this (decompression bombs),
            before anything is allocated.

    Returns:
        (height, width, 3) uint8 RGB, top row first.

    Raises:
        BmpUnsupported: a valid BMP variant not handled here.
        BmpError: not a BMP, truncated, or a header that contradicts itself or the file length.
    """
    if len(data) < FILE_HEADER + 4 or data[:2] != b"BM":
        raise BmpError("not a BMP file (no BM header)")
    offset, header_size = struct.unpack_from("<II", data, 10)
    if header_size not in INFO_HEADERS:
        raise BmpUnsupported(f"BMP header of {header_size} bytes")
    if len(data) < FILE_HEADER + header_size:
        raise BmpError(f"truncated: BMP header of {header_size} bytes, the file has {len(data)}")
    width, height, planes, bits, compression, _, _, _, colors = struct.unpack_from("<iiHHIIiiI", data, 18)
    top_down = height < 0
    height = abs(height)
    if width <= 0 or height == 0 or planes != 1:
        raise BmpError(f"bad BMP header: {width}x{height} pixels, {planes} planes")
    if width * height > max_pixels:
        raise BmpError(f"refused: {width}x{height} pixels is over the {max_pixels} limit (decompression bomb?)")
    table = FILE_HEADER + header_size  # masks (40-byte header) or palette follow the header
    if compression == BI_BITFIELDS and bits in (24, 32):
        if header_size == 40:
            if len(data) < table + 12:
                raise BmpError("truncated: BMP colour masks missing")
            table += 12
        masks = struct.unpack_from("<III", data, FILE_HEADER + 40)
        alpha = struct.unpack_from("<I", data, FILE_HEADER + 52)[0] if header_size >= 56 else 0
        if masks != STANDARD_MASKS or alpha not in (0, 0xFF000000):
            raise BmpUnsupported(f"BMP colour masks {', '.join(hex(m) for m in (*masks, alpha))}")
    elif compression != BI_RGB or bits not in (8, 24, 32):
        raise BmpUnsupported(f"{bits}-bit BMP with compression {compression}")
    palette = None
    if bits == 8:
        colors = colors or 256
        if colors > 256:
            raise BmpError(f"bad BMP header: {colors} palette colours for 8-bit pixels")
        if len(data) < table + 4 * colors:
            raise BmpError("truncated: BMP palette")
        palette = np.zeros((256, 3), np.uint8)  # indices past the palette are black, as in Pillow
        palette[:colors] = np.frombuffer(data, np.uint8, 4 * colors, table).reshape(colors, 4)[:, 2::-1]
        table += 4 * colors
    if offset < table:
        raise BmpError(f"bad BMP header: pixel data offset {offset} lies inside the header (ends at {table})")
    stride = (width * bits + 31) // 32 * 4
    if stride * height > len(data) - offset:
        raise BmpError(f"truncated: {width}x{height} pixels need {stride * height} bytes from offset {offset}, "
                       f"the file has {max(len(data) - offset, 0)}")
    rows = np.frombuffer(data, np.uint8, stride * height, offset).reshape(height, stride)
    if not top_down:
        rows = rows[::-1]
    if palette is not None:
        return palette[rows[:, :width]]
    step = bits // 8
    return np.ascontiguousarray(rows[:, :width * step].reshape(height, width, step)[:, :, 2::-1])
