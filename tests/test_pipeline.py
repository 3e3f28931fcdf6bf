"""Decode overlapped with inference (edgetune.runtime.pipeline), the thread count and the cache budget (issue 13).

`prefetch` must give the serial results in the serial order, hold at most `depth` results, hand a
producer's error to the caller and stop its thread when the caller stops early; the Trainer's
features (and so the feature cache) must be bit-identical with and without it. The thread count
defaults to this process's cores, `--threads` overrides it, and a bad value is one line, exit 2.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from edgetune.errors import UserError
from edgetune.runtime import Context, TrainSession
from edgetune.runtime.bounds import available_cores
from edgetune.runtime.pipeline import prefetch
from edgetune.runtime.trainer import Trainer
from tests.fixtures_data import write_dataset


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "edgetune-prefetch"]


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_prefetch_gives_the_serial_results_in_order(depth: int) -> None:
    items = list(range(25))
    out = list(prefetch(items, lambda i: i * i, depth))
    assert out == [(i, i * i) for i in items]
    assert not _prefetch_threads()


def test_prefetch_runs_ahead_at_most_depth() -> None:
    produced: list[int] = []
    lead = []
    gen = prefetch(range(20), lambda i: produced.append(i) or i, 2)
    for i, _ in gen:
        time.sleep(0.01)  # a slow consumer: the producer fills the queue and waits
        lead.append(len(produced) - (i + 1))
    # at most `depth` results queued, plus the one being produced while the queue is full
    assert max(lead) <= 3 and max(lead) >= 1


def test_prefetch_error_reaches_the_caller_after_earlier_results() -> None:
    def produce(i: int) -> int:
        if i == 3:
            raise ValueError("bad image 3")
        return i

    got = []
    with pytest.raises(ValueError, match="bad image 3"):
        for i, _ in prefetch(range(10), produce, 2):
            got.append(i)
    assert got == [0, 1, 2]
    assert not _prefetch_threads()


def test_prefetch_stops_its_producer_when_the_caller_stops() -> None:
    produced: list[int] = []
    gen = prefetch(range(10_000), lambda i: produced.append(i) or i, 2)
    for i, _ in gen:
        if i == 5:
            break
    gen.close()
    assert not _prefetch_threads()
    assert len(produced) <= 5 + 1 + 3  # never ran on to the end


@pytest.mark.parametrize("cache_dir", [False, True])
def test_overlapped_features_and_cache_are_bit_identical_to_serial(tiny_tod, tiny_split, tmp_path,
                                                                   cache_dir: bool) -> None:
    """The same split through the serial path (prefetch 0, 1 thread: the seed's) and the overlapped one
    (prefetch 3, 2 threads): equal feature arrays, equal cache rows, equal training."""
    path = tiny_tod(head="mlp")
    results = []
    for name, ctx in (("serial", Context(threads=1, prefetch=0, feature_batch=3)),
                      ("overlapped", Context(threads=2, prefetch=3, feature_batch=3))):
        if cache_dir:
            ctx = Context(threads=ctx.threads, prefetch=ctx.prefetch, feature_batch=3, cache_dir=tmp_path / name)
        assert ctx.decode_ahead == (0 if name == "serial" else 3)
        split, test = tiny_split(50), tiny_split(17, seed=3, name="test")
        session = TrainSession.create(path, ctx)
        trainer = Trainer(session, split, test, test_every=5, target_accuracy=None)
        feats = trainer.features(split)
        trainer.fit(12)
        cached = np.stack(session.feature_cache.get_many(split.keys + test.keys))
        results.append((feats, cached, {n: p.copy() for n, p in session.parameters().items()}))
    (f0, c0, p0), (f1, c1, p1) = results
    np.testing.assert_array_equal(f0, f1)
    np.testing.assert_array_equal(c0, c1)
    assert p0.keys() == p1.keys() and all(np.array_equal(p0[k], p1[k]) for k in p0)


def test_default_prefetch_follows_the_thread_count() -> None:
    assert Context(threads=1).decode_ahead == 0          # the seed's behaviour: nothing overlapped
    assert Context(threads=2).decode_ahead == 2
    assert Context(threads=1, prefetch=4).decode_ahead == 4
    with pytest.raises(UserError, match="prefetch must be >= 0"):
        Context(prefetch=-1)


def test_threads_default_to_the_cores_this_process_may_use() -> None:
    assert available_cores() == len(os.sched_getaffinity(0))
    assert Context().threads == available_cores()
    # pinned to one core, a child process defaults to one thread (the machine may have more)
    script = ("import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); "
              "from edgetune.runtime import Context; print(Context().threads)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "1"


def test_net_runner_threads_reach_onnxruntime_and_numpys_blas(tiny_tod, tmp_path, monkeypatch) -> None:
    """`--threads N` is onnxruntime's intra-op count, numpy's BLAS threads (set at run time: the
    environment variable was read when numpy loaded); without it, the cores this process may use."""
    from edgetune.cli import net_runner
    from edgetune.runtime import blas

    data = write_dataset(tmp_path / "data")
    seen = []
    create = TrainSession.create

    def spy(path, ctx=None):
        session = create(path, ctx)
        seen.append((session.frozen.session.get_session_options().intra_op_num_threads, blas.threads()))
        return session

    monkeypatch.setattr(TrainSession, "create", staticmethod(spy))
    before = blas.threads()
    try:
        for argv, threads in ((["--threads", "1"], 1), (["--threads", "3"], 3), ([], available_cores())):
            assert net_runner.main(["-f", tiny_tod(), "-d", os.fspath(data), "-c", "2", "-q", *argv]) == 0
            assert seen[-1][0] == threads
            if argv and before is not None:
                assert seen[-1][1] == threads
    finally:
        if before is not None:
            blas.set_threads(before)


@pytest.mark.parametrize("option, value, message", [
    ("--threads", "0", "--threads must be >= 1, got 0"),
    ("--threads", "-2", "--threads must be >= 1, got -2"),
    ("--cache-budget", "-1", "--cache-budget must be a finite number of MiB >= 0, got -1"),
    ("--cache-budget", "nan", "--cache-budget must be a finite number of MiB >= 0, got nan"),
])
def test_net_runner_bad_threads_or_cache_budget_is_one_line_exit_2(tiny_tod, tmp_path, option: str, value: str,
                                                                   message: str) -> None:
    data = write_dataset(tmp_path / "data")
    done = subprocess.run([sys.executable, "-m", "edgetune.cli.net_runner", "-f", tiny_tod(), "-d", os.fspath(data),
                           option, value], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"net_runner: error: {message}"]


def test_net_runner_cache_budget_goes_to_disk_with_the_same_run(tiny_tod, tmp_path, capsys) -> None:
    """`--cache-budget 0` puts every feature on disk at once: the printed run is the default's, line for line."""
    from edgetune.cli import net_runner

    data = write_dataset(tmp_path / "data")
    outputs = []
    for extra in ([], ["--cache-budget", "0"]):
        capsys.readouterr()
        assert net_runner.main(["-f", tiny_tod(), "-d", os.fspath(data), "-c", "12", "--test-every", "4",
                                "--target-accuracy", "2", *extra]) == 0
        outputs.append(capsys.readouterr().out.splitlines())
    assert outputs[0] == outputs[1] and len(outputs[0]) > 12


def test_fill_cache_keeps_only_the_cache(tiny_tod, tiny_split) -> None:
    """net_runner's up-front pass: the same cache rows as `features`, without building the (N, F) array."""
    split = tiny_split(30)
    filled = TrainSession.create(tiny_tod(), Context(threads=2, feature_batch=4))
    progress = []
    trainer = Trainer(filled, split, progress=lambda *a: progress.append(a))
    assert trainer.fill_cache(split) is None and progress[-1] == ("features train", 30, 30)
    progress.clear()
    trainer.fill_cache(split)  # all cached: the backbone runs on nothing, so no bar (no "30/30" at a made-up rate)
    assert progress == []
    more = tiny_split(40)  # its first 30 keys are split's (keys name seed, split and index): 10 to extract
    trainer.fill_cache(more)
    assert progress[-1] == ("features train (30 cached)", 10, 10)
    reference = Trainer(TrainSession.create(tiny_tod(), Context(threads=1)), split).features(split)
    np.testing.assert_array_equal(np.stack(filled.feature_cache.get_many(split.keys)), reference)
    with pytest.raises(UserError, match="fill_cache needs the feature cache"):
        Trainer(TrainSession.create(tiny_tod(), Context(cache=False)), split).fill_cache(split)
