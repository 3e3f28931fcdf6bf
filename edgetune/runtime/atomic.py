"""`write_atomic`: the one way edgetune writes a file that a crash must not leave torn.

Temp file in the same directory, write, flush, fsync, rename over the target, fsync the directory:
a reader (or the next run after a crash) sees the old file or the whole new one, never a mix. The
temp file is `.<name>.<random>.partial`: hidden, and never matching a glob such as `*.tod` or
`*.bmp`, so a leftover of a killed process is not mistaken for a result. Standard library only, so
every layer (runtime, data, host) can use it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from typing import BinaryIO

TEMP_SUFFIX = ".partial"
PERMISSION_BITS = 0o777  # what a replaced file's mode passes on: rwx for user, group, other; no set-id bits


Parts = Sequence[bytes | memoryview]


def write_atomic(path: str | os.PathLike, data: bytes | Parts | Callable[[BinaryIO], None], *,
                 durable: bool = True) -> str:
    """Replace `path` with `data` atomically, keeping the permissions of the file it replaces.

    Args:
        path: The file to write; its directory must exist.
        data: The bytes; or a list of byte buffers written in order (a model's tensors, which need
            not be joined into one copy first); or a function writing them to the open temp file
            (for an image's `save` or a streamed download, which need not be held in memory first).
        durable: fsync the file and its directory, so the new file survives a power cut. False
            only guards against a killed process: for files that are cheap to make again.

    Returns:
        `path`, as a string.

    Raises:
        OSError: creating, writing, syncing or renaming failed (full disk, no permission, ...);
            the message names `path`. Whatever `data(f)` itself raises propagates unchanged (it may
            be the caller's own error, such as a network failure). In every case the temp file is
            removed and any previous file at `path` is untouched.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=TEMP_SUFFIX, dir=directory)
    except OSError as e:
        raise _naming(path, e) from e
    in_writer = False
    try:
        os.fchmod(fd, _mode_for(path))
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                in_writer = True
                data(f)
                in_writer = False
            else:
                for part in (data,) if isinstance(data, bytes | bytearray | memoryview) else data:
                    f.write(part)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and not in_writer:
            raise _naming(path, e) from e
        raise
    if durable:
        _fsync_directory(directory)
    return path


def _naming(path: str, e: OSError) -> OSError:
    """The same error (errno kept, so callers can still test for ENOSPC) with the target's name."""
    return OSError(e.errno, f"cannot save {path}: {e.strerror or e}")


def _fsync_directory(directory: str) -> None:
    """Make the rename itself durable. Best effort: the file is already in place, and some file
    systems cannot open or fsync a directory, which must not turn a finished write into an error."""
    try:
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def _mode_for(path: str) -> int:
    """The permissions the written file gets: those of the file it replaces, else rw-r--r-- less the umask.

    mkstemp creates its file 0600; without this a checkpoint would be private where the model it
    came from was not. Only the permission bits (0o777) carry over, never setuid, setgid or sticky:
    a file someone made setuid must not hand that bit to the data written over it.
    """
    try:
        return os.stat(path).st_mode & PERMISSION_BITS
    except OSError:
        mask = os.umask(0o022)  # read the umask (set and put back; there is no getter)
        os.umask(mask)
        return 0o644 & ~mask
