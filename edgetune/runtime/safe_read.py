"""Reading a file someone else handed us: a regular file, inside its root, under a size cap, never blocking.

A dataset or cache folder can hold anything a file system can: a link to `~/.ssh/id_rsa` (its bytes
would become an "image" that is copied, cached or printed), a link to `/dev/zero` (read until memory
runs out), a FIFO (`open()` blocks forever), a procfs or sysfs file (it claims 0 or 4096 bytes and
holds something else). Every read of such a file goes through `open_regular` / `read_file`, so the
device loader, `prepare-data`, the feature cache and the `.tod` reader follow one rule:

1. With a `root`, links are resolved first and the real path must lie inside the real root.
2. The target must be a regular file before it is opened (devices are never opened: some act on
   open), and the opened descriptor must still be one (fstat): nothing swapped in between.
3. It is opened with `O_NONBLOCK | O_NOCTTY` (and `O_NOFOLLOW` on the resolved path), so even a
   FIFO or terminal raced in cannot block or become our terminal.
4. Its size is checked against the cap before a byte is read, and exactly that many bytes must be
   there: a file that holds more or less than it claims (procfs, sysfs, a file being rewritten) is
   refused instead of read without end.

Standard library only.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from typing import BinaryIO

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)


class UnsafeFile(OSError):
    """A file that is not read: not regular, outside its root, over its size cap, or not what it claims.

    Attributes:
        path: the file as given.
        reason: why, in words (`not a regular file (a FIFO)`, ...), without the path.
    """

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        super().__init__(f"{os.fspath(path)}: {reason}")
        self.path, self.reason = os.fspath(path), reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class TooLarge(UnsafeFile):
    """A file over the size cap the reader set (checked before a byte is read)."""


def inside(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    """True when `path`, links resolved, is `root` (links resolved) or lies under it."""
    real, real_root = os.path.realpath(path), os.path.realpath(root)
    return os.path.commonpath([real, real_root]) == real_root


def check_inside(path: str | os.PathLike, root: str | os.PathLike) -> str:
    """The real path of `path` (links resolved), which must lie inside `root`.

    Raises:
        UnsafeFile: it leads out of `root` (the reason names where to).
    """
    real = os.path.realpath(path)
    if not inside(real, root):
        how = "a link to" if os.path.islink(path) else "resolves to"  # else a folder link or `..` on the way
        raise UnsafeFile(path, f"{how} {real}, outside {os.fspath(root)}: not followed")
    return real


@contextlib.contextmanager
def open_regular(path: str | os.PathLike, *, max_bytes: int | None,
                 root: str | os.PathLike | None = None, why_cap: str = "") -> Iterator[BinaryIO]:
    """Open a file for reading only if it is a regular file within `root` and at most `max_bytes` long.

    Args:
        path: the file.
        max_bytes: the size cap, checked on the open descriptor before reading; None: no cap.
        root: a folder the file must lie in once links are resolved (a dataset, a cache); None
            for a file the user named, which may be a link to anywhere.
        why_cap: appended to the over-the-cap message (what the cap is).

    Yields:
        The open binary file; `os.fstat(f.fileno()).st_size` is its checked size.

    Raises:
        UnsafeFile: outside the root, a broken link, not a regular file, or over the cap (`TooLarge`).
        OSError: it cannot be opened (missing, no permission).
    """
    target = os.fspath(path)
    flags = _FLAGS
    if root is not None:
        target, flags = check_inside(target, root), flags | _NOFOLLOW
    try:
        before = os.stat(target)
    except FileNotFoundError:
        if os.path.islink(path):
            raise UnsafeFile(path, "broken or looping symlink") from None
        raise
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnsafeFile(path, "broken or looping symlink") from None
        raise
    _require_regular(path, before.st_mode)
    fd = os.open(target, flags)
    try:
        st = os.fstat(fd)
        _require_regular(path, st.st_mode)
        if (st.st_dev, st.st_ino) != (before.st_dev, before.st_ino):
            raise UnsafeFile(path, "replaced while it was opened")
        if root is not None and not _fd_inside(fd, root):
            raise UnsafeFile(path, f"moved out of {os.fspath(root)} while it was opened")
        if max_bytes is not None and st.st_size > max_bytes:
            raise TooLarge(path, f"{st.st_size} bytes, over the {max_bytes}-byte limit{why_cap}")
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        yield f


def read_file(path: str | os.PathLike, *, max_bytes: int | None,
              root: str | os.PathLike | None = None, why_cap: str = "") -> bytes:
    """The whole content of a checked regular file (see `open_regular`), exactly its stated size.

    Raises:
        UnsafeFile: as `open_regular`, or the file holds more or fewer bytes than its size says
            (a procfs/sysfs file, or one being rewritten).
        OSError: it cannot be opened or read.
    """
    with open_regular(path, max_bytes=max_bytes, root=root, why_cap=why_cap) as f:
        size = os.fstat(f.fileno()).st_size
        data = f.read(size + 1)  # one byte more than stated: a file that keeps going is caught
    if len(data) != size:
        raise UnsafeFile(path, f"holds {'more' if len(data) > size else 'fewer'} bytes than its stated size "
                               f"{size} (a procfs/sysfs file, or one being rewritten)")
    return data


def _require_regular(path: str | os.PathLike, mode: int) -> None:
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        raise UnsafeFile(path, "a directory, not a file")
    kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a special file")
    raise UnsafeFile(path, f"not a regular file ({kind})")


def _fd_inside(fd: int, root: str | os.PathLike) -> bool:
    """Where the open descriptor really points (Linux `/proc/self/fd`) lies in `root`; True where unknown.

    The path was resolved before the open: a folder on the way swapped for a link in between would
    otherwise lead the open outside the root.
    """
    try:
        real = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return True
    return inside(real, root)
