"""Crashes mid-training lose nothing: SIGKILL at random moments, a full disk, a failing save, NaN.

The SIGKILL trials run the real `net_runner` on the tiny model (tests/fixtures_runtime.py) and a
3-class 8x8 BMP dataset, kill it at seeded random moments, check that every `.tod` left on disk
loads and verifies, resume from the newest checkpoint (possibly several kill/resume rounds) and
compare the final weights and optimizer state with an uninterrupted run, bit for bit.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgetune.runtime import atomic
from edgetune.runtime import format as tod_format
from tests.fixtures_data import write_dataset
from tests.fixtures_runtime import tiny_model

CYCLES, SAVE_EVERY, TRIALS = 200, 5, 30
RUN_FLAGS = ("-s", str(SAVE_EVERY), "--target-accuracy", "2", "--seed", "0", "-q")


def net_runner(model: Path, data: Path, cycles: int, *extra: str) -> list[str]:
    """The argv of a net_runner run (the feature cache lives next to the model, as on the device)."""
    return [sys.executable, "-m", "edgetune.cli.net_runner", "-f", os.fspath(model), "-d", os.fspath(data),
            "-c", str(cycles), "--cache-dir", os.fspath(model.parent / "cache"), *RUN_FLAGS, *extra]


def state(path: str | os.PathLike) -> dict[str, Any]:
    """What must match an uninterrupted run: every tensor (weights, optimizer slots) and the step."""
    tod = tod_format.load_file(path)
    return {"step": tod.meta["optimizer_step"], "record_steps": tod.meta["training"]["steps"],
            **{k: v.tobytes() for k, v in tod.tensors.items()}}


@pytest.fixture(scope="module")
def crash_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The model, the dataset, and an uninterrupted reference run (its final state and duration)."""
    root = tmp_path_factory.mktemp("crash")
    data = write_dataset(root / "data")
    model = root / "model.tod"
    tod_format.save_file(tiny_model(), model)
    ref = root / "reference"
    ref.mkdir()
    shutil.copy(model, ref / "model.tod")
    start = time.monotonic()
    subprocess.run(net_runner(ref / "model.tod", data, CYCLES), check=True, capture_output=True, timeout=120)
    return {"model": model, "data": data, "final": state(ref / "model_trained.tod"),
            "seconds": time.monotonic() - start}


def checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """(optimizer step, path) of every `.tod` in `directory`; each one must load and verify."""
    found = []
    for path in sorted(directory.glob("*.tod")):
        tod = tod_format.load_file(path)  # raises if any file is torn or corrupt
        found.append((int(tod.meta["optimizer_step"]), path))
    return found


def kill_at_random(argv: list[str], rng: np.random.Generator, seconds: float) -> str:
    """Start a run and SIGKILL it: at a uniform moment of a whole run, or once training has begun.

    Returns:
        When the kill landed: "start-up", "training" or "finished" (the run ended first).
    """
    directory = Path(argv[argv.index("-f") + 1]).parent
    before = set(directory.glob("*_trained_*.tod"))
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if rng.random() < 0.5:
            time.sleep(rng.uniform(0, seconds))
        else:  # wait for its first new checkpoint, then a uniform moment of the training part
            deadline = time.monotonic() + 60
            while proc.poll() is None and set(directory.glob("*_trained_*.tod")) <= before:
                if time.monotonic() > deadline:
                    raise AssertionError("no checkpoint within 60 s")
                time.sleep(0.002)
            time.sleep(rng.uniform(0, seconds / 3))
        if proc.poll() is not None:
            return "finished"
        landed = "training" if set(directory.glob("*_trained_*.tod")) > before else "start-up"
        proc.send_signal(signal.SIGKILL)
        return landed
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_nothing(crash_env: dict[str, Any], tmp_path: Path) -> None:
    model, data, want = crash_env["model"], crash_env["data"], crash_env["final"]
    tally: dict[str, int] = {"start-up": 0, "training": 0, "finished": 0}
    files_checked = leftovers = 0
    for trial in range(TRIALS):
        rng = np.random.default_rng(trial)
        trial_dir = tmp_path / f"trial{trial}"
        trial_dir.mkdir()
        current = trial_dir / "model.tod"
        shutil.copy(model, current)
        for _ in range(int(rng.integers(1, 4))):  # 1-3 kills, each followed by a resume
            step = dict((p, s) for s, p in checkpoints(trial_dir))[current]
            tally[kill_at_random(net_runner(current, data, CYCLES - step), rng, crash_env["seconds"])] += 1
            found = checkpoints(trial_dir)
            files_checked += len(found)
            step, current = max(found, key=lambda sp: (sp[0], len(sp[1].name)))
            if step == CYCLES:
                break
        if step < CYCLES:  # the last resume runs to the end
            subprocess.run(net_runner(current, data, CYCLES - step), check=True, capture_output=True, timeout=120)
            current = current.with_name(current.stem + "_trained.tod")
        got = state(current)
        assert got == want, f"trial {trial}: resumed from {current.name}, state differs from the uninterrupted run"
        leftovers += len(list(trial_dir.glob(".*.partial")))  # torn temp files of killed saves: never *.tod
    print(f"\nSIGKILL trials: {TRIALS}, kills {sum(tally.values())} ({tally}), .tod files verified {files_checked}, "
          f"temp leftovers {leftovers}", file=sys.stderr)
    assert tally["training"] >= TRIALS // 2  # most kills really hit a run that was training


# --- a failing save keeps the previous file -------------------------------------------------------------


def _fail(err: int):
    def raise_(*args: Any, **kwargs: Any) -> Any:
        raise OSError(err, os.strerror(err))
    return raise_


class _FullDiskFile:
    """What `os.fdopen` returns when the disk fills during the write."""

    def __init__(self, fd: int, *args: Any) -> None:
        self.fd = fd

    def __enter__(self) -> _FullDiskFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        os.close(self.fd)

    def write(self, data: bytes) -> int:
        os.write(self.fd, data[:len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


FAULTS = {
    "disk full during write": ("os.fdopen", _FullDiskFile, errno.ENOSPC),
    "disk full at fsync": ("os.fsync", _fail(errno.ENOSPC), errno.ENOSPC),
    "I/O error at fsync": ("os.fsync", _fail(errno.EIO), errno.EIO),
    "permission denied creating the temp file": ("tempfile.mkstemp", _fail(errno.EACCES), errno.EACCES),
    "permission denied at rename": ("os.replace", _fail(errno.EACCES), errno.EACCES),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_failed_save_keeps_previous_checkpoint(fault: str, tiny_tod, monkeypatch, tmp_path: Path) -> None:
    """Session.save over an existing checkpoint fails with an OSError naming the file; the old bytes stay."""
    from edgetune.runtime import TrainSession

    sess = TrainSession.create(tiny_tod())
    target = tmp_path / "ckpt.tod"
    sess.save(target)
    old = target.read_bytes()
    sess.run_head(np.ones((4, 8), np.float32), np.array([0, 1, 2, 0]))  # the weights change
    where, replacement, err = FAULTS[fault]
    module, name = where.split(".")
    monkeypatch.setattr(vars(atomic)[module], name, replacement)  # the module that writes the file
    with pytest.raises(OSError) as info:
        sess.save(target)
    monkeypatch.undo()
    assert info.value.errno == err and "cannot save" in str(info.value) and str(target) in str(info.value)
    assert target.read_bytes() == old
    assert sorted(os.listdir(tmp_path)) == ["ckpt.tod"]  # the temp file was removed
    assert tod_format.load_file(target).meta["optimizer_step"] == 0


@pytest.fixture
def tmpfs(tmp_path: Path):
    """A 96 KiB tmpfs (root only; skipped elsewhere): room for the model and a few checkpoints."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", os.fspath(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", os.fspath(mnt)], check=True)


def test_full_disk_mid_training(crash_env: dict[str, Any], tmpfs: Path) -> None:
    """net_runner on a small tmpfs: the disk fills at some checkpoint; one clear error line, exit 2,
    every `.tod` left is whole, and resuming elsewhere from the newest one finishes the run exactly."""
    shutil.copy(crash_env["model"], tmpfs / "model.tod")
    argv = net_runner(tmpfs / "model.tod", crash_env["data"], CYCLES)
    cache = argv.index("--cache-dir")
    del argv[cache:cache + 2]  # features in memory: the tmpfs is for checkpoints
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert lines[-1].startswith("net_runner: error:") and "No space left on device" in lines[-1]
    assert "Traceback" not in done.stderr
    found = checkpoints(tmpfs)
    assert len(found) >= 3 and not list(tmpfs.glob(".*.partial"))
    step, newest = max(found)
    assert 0 < step < CYCLES
    with tempfile.TemporaryDirectory() as elsewhere:
        resumed = Path(elsewhere) / newest.name
        shutil.copy(newest, resumed)
        subprocess.run(net_runner(resumed, crash_env["data"], CYCLES - step), check=True, capture_output=True,
                       timeout=120)
        assert state(resumed.with_name(resumed.stem + "_trained.tod")) == crash_env["final"]


# --- NaN / inf loss ---------------------------------------------------------------------------------


def test_nan_loss_stops_with_clear_error(crash_env: dict[str, Any], tmp_path: Path) -> None:
    """A learning rate near float32's max blows up the head: exit 2, one line naming the divergence,
    no `_trained.tod` written, and every checkpoint saved before has finite weights."""
    shutil.copy(crash_env["model"], tmp_path / "model.tod")
    argv = net_runner(tmp_path / "model.tod", crash_env["data"], 50, "-s", "1", "--lr", "3.4e38")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("net_runner: error: training diverged at step") and "not applied" in last
    assert not (tmp_path / "model_trained.tod").exists()
    found = checkpoints(tmp_path)
    assert len(found) >= 2
    for _, path in found:
        assert all(np.isfinite(t).all() for t in tod_format.load_file(path).tensors.values()), path.name


def test_update_that_overflows_is_not_applied(tiny_split, tmp_path: Path) -> None:
    """Finite loss and gradients whose update overflows a weight to inf: that step must be refused
    like a NaN loss, so no checkpoint ever holds a non-finite weight."""
    from edgetune.runtime import TrainingDiverged, TrainSession
    from edgetune.runtime.trainer import Trainer

    tod = tiny_model(head="dense")
    tod.tensors["param/head.bias"][:] = 3.3e38  # equal biases: softmax ignores them, the loss stays finite
    path = tod_format.save_file(tod, tmp_path / "m.tod")
    sess = TrainSession.create(path)
    sess.learning_rate = 1e38
    trainer = Trainer(sess, tiny_split(20), None, save_every=1, target_accuracy=None)
    with np.errstate(all="ignore"), pytest.raises(TrainingDiverged):
        trainer.fit(5)
    for ckpt in sorted(tmp_path.glob("m_trained_*.tod")):
        tensors = tod_format.load_file(ckpt).tensors
        assert all(np.isfinite(t).all() for t in tensors.values()), f"{ckpt.name} holds a non-finite weight"
    assert all(np.isfinite(p.data).all() for p in sess.params.values())
