"""Read IDX files (the MNIST / Fashion-MNIST container), plain or gzipped, with numpy only.

An IDX file is: two zero bytes, a type code, the number of dimensions d, then d big-endian u32
sizes, then the values in C order, big-endian. Every size is checked against the byte count before
anything is allocated, so a truncated download gives a clear error instead of a garbage array. The
file is read by the one safe reader (`safe_read`: a regular file in its folder, never blocking) and
both it and its gunzipped bytes are capped at `MAX_IDX_BYTES`, so a gzip bomb stops at the cap.
"""

from __future__ import annotations

import gzip
import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from edgetune.errors import UserError
from edgetune.runtime.bounds import MAX_IDX_BYTES
from edgetune.runtime.safe_read import read_file

# type code -> numpy dtype (big-endian), from the format's description at yann.lecun.com/exdb/mnist
IDX_TYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"),
             0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def find_idx(directory: str | os.PathLike, stem: str) -> Path | None:
    """The IDX file `stem` in `directory`, plain or `.gz` (Debian ships them gzipped); None if absent."""
    directory = Path(os.fspath(directory))
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file into an array of its declared shape (native byte order).

    Args:
        path: the file; gzip is detected from its first bytes, not its name.

    Returns:
        The values, shaped as the header says.

    Raises:
        UserError: not an IDX file, unknown type code, fewer bytes than the header declares, or
            more than `MAX_IDX_BYTES` once gunzipped.
        UnsafeFile: not a regular file in its folder, or larger than `MAX_IDX_BYTES`.
    """
    path = Path(os.fspath(path))
    raw = read_file(path, max_bytes=MAX_IDX_BYTES, root=path.parent)
    if raw[:2] == b"\x1f\x8b":
        try:
            with gzip.GzipFile(fileobj=io.BytesIO(raw)) as f:
                raw = f.read(MAX_IDX_BYTES + 1)  # a bomb stops here, one byte past the cap
        except (OSError, EOFError, zlib.error) as e:
            raise UserError(f"{path}: broken gzip data ({e})") from None
        if len(raw) > MAX_IDX_BYTES:
            raise UserError(f"{path}: more than {MAX_IDX_BYTES} bytes once gunzipped (a gzip bomb?)")
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in IDX_TYPES:
        raise UserError(f"{path}: not an IDX file")
    dtype, ndim = IDX_TYPES[raw[2]], raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise UserError(f"{path}: IDX header truncated")
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if len(raw) - offset != expected:
        raise UserError(f"{path}: header declares {shape} ({expected} bytes) but holds {len(raw) - offset}")
    return np.frombuffer(raw, dtype, offset=offset).reshape(shape).astype(dtype.newbyteorder("="))
