"""The `.tod` device model file: read, verify and write, with numpy and the standard library only.

Layout (all integers little-endian; see docs/FORMAT.md for the full contract):

    0   8   magic              b"EDGETOD\\0"
    8   2   major version      u16
    10  2   minor version      u16
    12  4   reserved           u32, zero
    16  8   header length N    u64, a multiple of 8, at most MAX_HEADER
    24  32  SHA-256 of the header bytes
    56  N   header             UTF-8 JSON, right-padded with spaces
    56+N    data               entries at 8-aligned offsets, zero padding between, nothing after

The header is `{"meta": {...}, "entries": {name: {...}}}`. An entry is a tensor
(`dtype`, `shape`, `offsets`, `sha256`) or an opaque blob such as the frozen ONNX graph
(`offsets`, `sha256`). Entries are laid in sorted name order and the header JSON is written with
sorted keys, so the same content always gives the same bytes.

Why not pickle, npz or a zip: a reader that only parses JSON and slices bytes cannot run code, and
checking every size against the file length before allocating means a lying header cannot make it
allocate more than the file holds.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgetune.runtime.atomic import write_atomic
from edgetune.runtime.bounds import OverBudget, entries_problem, memory_limit
from edgetune.runtime.safe_read import TooLarge, UnsafeFile, read_file

MAGIC = b"EDGETOD\x00"
MAJOR, MINOR = 2, 0  # the newest version this reader knows; a file is written at its own `TodFile.version`
PREAMBLE = struct.Struct("<8sHHIQ32s")  # magic, major, minor, reserved, header length, header sha256
MAX_HEADER = 64 * 1024 * 1024
ALIGN = 8
DTYPES = {"float32": np.float32, "float64": np.float64, "int64": np.int64, "int32": np.int32, "uint8": np.uint8}


class TodError(Exception):
    """Any reason a `.tod` file cannot be read; the only exception the reader raises for bad bytes."""


class TruncatedError(TodError):
    """The file ends before what its header declares."""


class MagicError(TodError):
    """Not a `.tod` file at all."""


class VersionError(TodError):
    """Written by a newer major version of the format."""


class HeaderError(TodError):
    """The header is not valid JSON of the expected shape, or its offsets do not tile the data."""


class ChecksumError(TodError):
    """A part's bytes do not match their SHA-256."""


@dataclass
class TodFile:
    """The parsed contents of a `.tod`: metadata, named tensors and named opaque blobs.

    `version` is the (major, minor) the file declares: 1.0 unless its content needs more (2.0: a
    trainable sub-graph with buffers, docs/FORMAT.md); a file read and saved again keeps it, so a
    version-1 model's checkpoints stay version-1 files, byte for byte what they were.
    """

    meta: dict[str, Any]
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)
    version: tuple[int, int] = (1, 0)


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def save(tod: TodFile) -> bytes:
    """Serialize to bytes. The output depends only on the content, never on dict order."""
    return b"".join(_parts(tod))


def _parts(tod: TodFile) -> list[bytes | memoryview]:
    """The file's bytes in order: preamble, header, then each entry's padding and data.

    The data parts are views of the tensors' own memory, not copies: `save_file` writes them
    straight to the file, so saving a model never holds a second copy of it (it used to hold three:
    the arrays, their `tobytes` and the joined file).
    """
    names = sorted(set(tod.tensors) | set(tod.blobs))
    if set(tod.tensors) & set(tod.blobs):
        raise ValueError(f"names used for both a tensor and a blob: {sorted(set(tod.tensors) & set(tod.blobs))}")
    entries: dict[str, dict[str, Any]] = {}
    chunks: list[bytes | memoryview] = []
    pos = 0
    for name in names:
        if name in tod.tensors:
            arr = np.asarray(tod.tensors[name], order="C")  # not ascontiguousarray: it makes 0-d arrays 1-d
            dtype = arr.dtype.name
            if dtype not in DTYPES:
                raise ValueError(f"tensor {name!r}: dtype {dtype} is not one of {sorted(DTYPES)}")
            little = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
            raw = memoryview(little.reshape(-1).view(np.uint8))  # its bytes, in place
            entry: dict[str, Any] = {"dtype": dtype, "shape": list(arr.shape)}
        else:
            raw = memoryview(tod.blobs[name]).cast("B")
            entry = {}
        start = _align(pos)
        chunks.append(b"\x00" * (start - pos))
        chunks.append(raw)
        pos = start + len(raw)
        entry["offsets"] = [start, pos]
        entry["sha256"] = hashlib.sha256(raw).hexdigest()
        entries[name] = entry
    header = json.dumps({"entries": entries, "meta": tod.meta}, sort_keys=True, separators=(",", ":"),
                        ensure_ascii=False, allow_nan=False).encode("utf-8")
    header += b" " * (_align(len(header)) - len(header))
    if len(header) > MAX_HEADER:
        raise ValueError(f"header of {len(header)} bytes exceeds the {MAX_HEADER}-byte limit")
    major, minor = tod.version
    if not (1 <= major <= MAJOR and minor >= 0):
        raise ValueError(f"cannot write format version {major}.{minor} (this writer knows 1.0 to {MAJOR}.{MINOR})")
    pre = PREAMBLE.pack(MAGIC, major, minor, 0, len(header), hashlib.sha256(header).digest())
    return [pre, header, *chunks]


def load(data: bytes | memoryview, *, verify: bool = True) -> TodFile:
    """Parse and verify bytes produced by `save`.

    Raises:
        TodError: a subclass naming what is wrong; nothing else for any input bytes.
    """
    view = memoryview(data)
    if len(view) < PREAMBLE.size:
        if bytes(view[:len(MAGIC)]) != MAGIC[:len(view)]:
            raise MagicError("not an edgetune .tod file (bad magic)")
        raise TruncatedError(f"file is {len(view)} bytes, shorter than the {PREAMBLE.size}-byte preamble")
    magic, major, minor, reserved, hlen, hsum = PREAMBLE.unpack_from(view, 0)
    if magic != MAGIC:
        raise MagicError("not an edgetune .tod file (bad magic)")
    if major > MAJOR:
        raise VersionError(f"format version {major}.{minor} is newer than this reader ({MAJOR}.{MINOR}); upgrade edgetune")
    if major < 1:
        raise VersionError(f"format version {major}.{minor} is not a released version")
    if reserved != 0 or hlen % ALIGN or hlen > MAX_HEADER:
        raise HeaderError(f"bad preamble (header length {hlen}, reserved {reserved})")
    data_start = PREAMBLE.size + hlen
    if data_start > len(view):
        raise TruncatedError(f"header declares {hlen} bytes but the file has {len(view) - PREAMBLE.size} after the preamble")
    header_bytes = bytes(view[PREAMBLE.size:data_start])
    if hashlib.sha256(header_bytes).digest() != hsum:
        raise ChecksumError("header checksum mismatch: the file is corrupt")
    header = _parse_header(header_bytes)
    body = view[data_start:]
    tod = TodFile(meta=header["meta"], version=(major, minor))
    pos = 0
    for name in sorted(header["entries"]):
        entry = header["entries"][name]
        start, end = _offsets(name, entry)
        if start != _align(pos) or any(body[pos:start]):
            raise HeaderError(f"entry {name!r} does not follow the previous one at an aligned offset")
        if end > len(body):
            raise TruncatedError(f"entry {name!r} ends at {end} but the data section has {len(body)} bytes")
        raw = body[start:end]
        if verify and hashlib.sha256(raw).hexdigest() != entry.get("sha256"):
            raise ChecksumError(f"entry {name!r} checksum mismatch: the file is corrupt")
        if "dtype" in entry:
            tod.tensors[name] = _tensor(name, entry, raw)
        else:
            tod.blobs[name] = bytes(raw)
        pos = end
    if pos != len(body):
        raise HeaderError(f"{len(body) - pos} bytes after the last entry")
    return tod


def _parse_header(header_bytes: bytes) -> dict[str, Any]:
    """Parse the header JSON, accepting only what `save` could write back.

    NaN, infinities (also from overflowing literals such as 1e999) and lone surrogates parse in
    Python's json but cannot be saved again: rejecting them here means a model that loads can
    always be checkpointed, instead of failing at its first save mid-training.
    """
    def finite(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise ValueError(f"number {text[:40]} is not finite")
        return value

    def no_constant(name: str) -> None:
        raise ValueError(f"{name} is not allowed")

    try:
        header = json.loads(header_bytes.decode("utf-8"), parse_float=finite, parse_constant=no_constant)
        json.dumps(header, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (UnicodeError, ValueError, RecursionError) as e:
        raise HeaderError(f"header is not valid JSON: {e}") from None
    if not isinstance(header, dict) or not isinstance(header.get("meta"), dict) or not isinstance(header.get("entries"), dict):
        raise HeaderError("header must be an object with 'meta' and 'entries' objects")
    if problem := entries_problem(header["entries"]):
        raise HeaderError(problem)
    return header


def _offsets(name: str, entry: Any) -> tuple[int, int]:
    offs = entry.get("offsets") if isinstance(entry, dict) else None
    if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs) and 0 <= offs[0] <= offs[1]):
        raise HeaderError(f"entry {name!r} has bad offsets")
    return offs[0], offs[1]


def _tensor(name: str, entry: dict[str, Any], raw: memoryview) -> np.ndarray:
    dtype, shape = entry.get("dtype"), entry.get("shape")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise HeaderError(f"tensor {name!r} has unknown dtype {dtype!r}")
    if not (isinstance(shape, list) and len(shape) <= 8 and all(type(d) is int and 0 <= d < 2**40 for d in shape)):
        raise HeaderError(f"tensor {name!r} has a bad shape {shape!r}")
    itemsize = np.dtype(DTYPES[dtype]).itemsize
    count = 1
    for d in shape:  # Python ints: no overflow, and checked against the bytes actually present
        count *= d
    if count * itemsize != len(raw):
        raise HeaderError(f"tensor {name!r}: shape {shape} x {dtype} needs {count * itemsize} bytes, entry has {len(raw)}")
    return np.frombuffer(raw, dtype=np.dtype(DTYPES[dtype]).newbyteorder("<")).astype(DTYPES[dtype]).reshape(shape)


def save_file(tod: TodFile, path: str | os.PathLike) -> str:
    """Write atomically (edgetune.runtime.atomic): temp file, fsync, rename, fsync the directory.

    A crash at any point leaves either the old file or the new one, never a torn one. The temp file
    is `.<name>.<random>.partial`, so a crash's leftover never matches `*.tod`. A replaced file
    keeps its permissions; a new one gets rw-r--r-- less the umask.

    Returns:
        The path written.

    Raises:
        OSError: the write failed (full disk, no permission, ...); the message names `path`, the
            temp file is removed and any previous file at `path` is untouched.
    """
    return write_atomic(path, _parts(tod))


def load_file(path: str | os.PathLike, *, verify: bool = True) -> TodFile:
    """Read and verify a `.tod` file.

    Only regular files are read (`safe_read`): a FIFO would block forever and a device such as
    /dev/zero would be read until memory runs out. A file larger than half the memory the process
    can get is refused before a byte is read.

    Raises:
        TodError: bad bytes, or not a regular file (the message names the file).
        OverBudget: the file does not fit in memory.
        OSError: the file cannot be opened.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory, not a .tod file")
    try:  # read whole, then parsed into copies: at most half the memory the process can get
        data = read_file(path, max_bytes=memory_limit(), why_cap=" (half the memory this process can get)")
    except TooLarge as e:
        raise OverBudget(str(e)) from None
    except UnsafeFile as e:
        raise MagicError(f"{e}, so not a .tod file") from None
    try:
        return load(data, verify=verify)
    except TodError as e:
        raise type(e)(f"{path}: {e}") from None
