"""`write_atomic`: all or nothing, the temp file never left behind, permissions and durability kept."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from edgetune.runtime.atomic import write_atomic


def _recording_fsync(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace os.fsync by one that records what it syncs ("file" or "dir") and then really syncs."""
    real, synced = os.fsync, []

    def fsync(fd: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced


def test_bytes_parts_and_callable_forms_write_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced = _recording_fsync(monkeypatch)
    assert write_atomic(tmp_path / "a.bin", b"\x00abc") == str(tmp_path / "a.bin")
    assert synced == ["file", "dir"]  # durable: the data, then the rename

    def stream(f: BinaryIO) -> None:
        for i in range(3):
            f.write(bytes([i]) * 1000)

    write_atomic(tmp_path / "b.bin", stream, durable=False)
    assert synced == ["file", "dir"]  # durable=False: no fsync at all
    assert (tmp_path / "a.bin").read_bytes() == b"\x00abc"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00" * 1000 + b"\x01" * 1000 + b"\x02" * 1000
    write_atomic(tmp_path / "c.bin", [b"ab", memoryview(b"cd"), bytearray(b"e")])  # parts, written in order
    assert (tmp_path / "c.bin").read_bytes() == b"abcde" and synced == ["file", "dir"] * 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.bin", "c.bin"]


def test_temp_file_is_hidden_partial_and_target_untouched_meanwhile(tmp_path: Path) -> None:
    target = tmp_path / "m.tod"
    target.write_bytes(b"old")
    seen: list[Any] = []

    def writer(f: BinaryIO) -> None:
        f.write(b"new")
        seen.append(([p.name for p in tmp_path.iterdir() if p != target], target.read_bytes()))

    write_atomic(target, writer)
    (temps, during), = seen
    assert during == b"old"
    assert len(temps) == 1 and temps[0].startswith(".m.tod.") and temps[0].endswith(".partial")
    assert not list(tmp_path.glob("*.tod.*")) and [p.name for p in tmp_path.iterdir()] == ["m.tod"]
    assert target.read_bytes() == b"new"


@pytest.mark.parametrize("where", ["fsync", "replace"])
def test_failure_keeps_old_file_and_names_path(where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "ckpt.tod"
    target.write_bytes(b"old bytes \x00\xff")

    def fail(*args: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, where, fail)
    with pytest.raises(OSError) as info:
        write_atomic(target, b"new bytes that never land")
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC
    assert str(info.value) == f"[Errno {errno.ENOSPC}] cannot save {target}: No space left on device"
    assert target.read_bytes() == b"old bytes \x00\xff"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.tod"]


@pytest.mark.parametrize("error", [ConnectionResetError(errno.ECONNRESET, "reset by peer"), KeyboardInterrupt()])
def test_writer_errors_propagate_unchanged(error: BaseException, tmp_path: Path) -> None:
    """What the callable raises is the caller's (a network error, Ctrl-C): the same object comes back,
    after half the data was written, and the temp file is gone."""
    target = tmp_path / "w.pth"
    target.write_bytes(b"previous")

    def writer(f: BinaryIO) -> None:
        f.write(b"half of it")
        f.flush()
        raise error

    with pytest.raises(type(error)) as info:
        write_atomic(target, writer)
    assert info.value is error
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["w.pth"]


def test_mkstemp_failure_names_path(tmp_path: Path) -> None:
    with pytest.raises(OSError) as info:
        write_atomic(tmp_path / "missing" / "x.tod", b"data")
    assert info.value.errno == errno.ENOENT and f"cannot save {tmp_path / 'missing' / 'x.tod'}" in str(info.value)


def test_mode_of_new_and_replaced_files(tmp_path: Path) -> None:
    """New: 0644 less the umask (not mkstemp's 0600). Replaced: the old file's mode, even an odd one."""
    old_mask = os.umask(0o027)
    try:
        path = write_atomic(tmp_path / "new.bin", b"1")
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
        os.chmod(path, 0o604)
        write_atomic(path, lambda f: f.write(b"2"), durable=False)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o604
        assert Path(path).read_bytes() == b"2"
    finally:
        os.umask(old_mask)


@pytest.mark.parametrize("old_mode", [0o4755, 0o2750, 0o1777, 0o7777, 0o6644])
def test_set_id_and_sticky_bits_of_a_replaced_file_are_dropped(old_mode: int, tmp_path: Path) -> None:
    """Only the permission bits (0o777) carry over: a file someone made setuid or setgid must not hand
    that bit to a checkpoint written over it (issue 16)."""
    path = tmp_path / "m.tod"
    path.write_bytes(b"old")
    os.chmod(path, old_mode)
    write_atomic(path, b"new")
    assert stat.S_IMODE(os.stat(path).st_mode) == old_mode & 0o777
    assert path.read_bytes() == b"new"
