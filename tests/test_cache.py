"""FeatureCache: memory and disk, crash safety (torn or corrupt segments are never used), staleness."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from edgetune.runtime import Context, FeatureCache, TrainSession
from edgetune.runtime.cache import content_keys, namespace_for


def rows(n: int, f: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, f)).astype(np.float32)


@pytest.mark.parametrize("on_disk", [False, True])
def test_put_and_get(tmp_path, on_disk: bool) -> None:
    cache = FeatureCache("ns", tmp_path if on_disk else None)
    data = rows(4)
    cache.put_many(["a", "b", "c", "d"], data)
    cache.put_many(["a", "e"], rows(2, seed=1))  # "a" is kept, not overwritten
    cache.flush()
    got = cache.get_many(["d", "zz", "a", "e"])
    np.testing.assert_array_equal(got[0], data[3])
    assert got[1] is None and len(cache) == 5 and "e" in cache
    np.testing.assert_array_equal(got[2], data[0])


def test_disk_cache_survives_a_restart(tmp_path) -> None:
    data = rows(6)
    cache = FeatureCache("ns", tmp_path)
    cache.put_many(list("abcdef"), data)
    cache.flush()
    again = FeatureCache("ns", tmp_path)
    got = again.get_many(list("fedcba"))
    np.testing.assert_array_equal(np.stack(got), data[::-1])
    assert len(FeatureCache("other", tmp_path)) == 0  # another namespace sees nothing


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc/self/maps")
def test_rows_on_disk_are_read_not_mapped(tmp_path) -> None:
    """A mapped row would pull a whole large folio into RSS; a read copies the row only."""
    data = rows(300, f=2000)
    cache = FeatureCache("ns", tmp_path)
    cache.put_many([str(i) for i in range(300)], data)
    cache.flush()
    got = FeatureCache("ns", tmp_path).get_many([str(i) for i in (7, 250, 3)])
    np.testing.assert_array_equal(np.stack(got), data[[7, 250, 3]])
    got[0][0] = 1.0  # the caller's copy: writable, and the cache is untouched
    np.testing.assert_array_equal(FeatureCache("ns", tmp_path).get_many(["7"])[0], data[7])
    maps = open("/proc/self/maps").read()
    assert str(tmp_path) not in maps  # no segment file is mapped into the process


def _segment(tmp_path) -> str:
    (seg,) = [f for f in os.listdir(tmp_path / "ns") if f.endswith(".json")]
    return str(tmp_path / "ns" / seg[:-5])


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_index", "bad_index", "no_data", "wrong_shape"])
def test_damaged_segments_are_never_used(tmp_path, damage: str, capsys) -> None:
    FeatureCache("ns", tmp_path, segment_rows=2).put_many(["a", "b"], rows(2))
    base = _segment(tmp_path)
    if damage == "truncate":  # a torn data file
        with open(base + ".f32", "r+b") as f:
            f.truncate(12)
    elif damage == "flip":  # same size, wrong bytes
        raw = bytearray(open(base + ".f32", "rb").read())
        raw[5] ^= 1
        open(base + ".f32", "wb").write(raw)
    elif damage == "no_index":  # crash between data and index
        os.unlink(base + ".json")
    elif damage == "bad_index":
        open(base + ".json", "w").write('{"keys": ["a", ')
    elif damage == "no_data":
        os.unlink(base + ".f32")
    elif damage == "wrong_shape":
        index = json.load(open(base + ".json"))
        index["shape"] = [1, 10]
        index["keys"] = ["a"]
        json.dump(index, open(base + ".json", "w"))
    cache = FeatureCache("ns", tmp_path, width=5)
    assert cache.get_many(["a", "b"]) == [None, None]
    if damage != "no_index":
        assert cache.rejected == [base] and "ignoring damaged segment" in capsys.readouterr().err


@pytest.mark.parametrize("change", ["truncate", "replace_other", "remove", "rewrite_same"])
def test_segment_changed_after_it_was_checked_is_dropped_not_read(tmp_path, change: str, capsys) -> None:
    """Another process shrinking, replacing or removing a segment after this one checked it: its rows
    become misses (computed again) with one warning, never a short or foreign read; the same rows
    written again (a new file by rename, as edgetune writes) are checked anew and still read."""
    from edgetune.runtime.atomic import write_atomic

    data = rows(4)
    writer = FeatureCache("ns", tmp_path)
    writer.put_many(list("abcd"), data)
    writer.flush()
    cache = FeatureCache("ns", tmp_path, width=5)
    base = _segment(tmp_path)
    if change == "truncate":
        with open(base + ".f32", "r+b") as f:
            f.truncate(20)
    elif change == "replace_other":  # same size, other values, by rename
        write_atomic(base + ".f32", rows(4, seed=9).tobytes())
    elif change == "remove":
        os.unlink(base + ".f32")
    else:
        write_atomic(base + ".f32", data.tobytes())
    got = cache.get_many(["c", "a"])
    err = capsys.readouterr().err
    if change == "rewrite_same":
        np.testing.assert_array_equal(np.stack(got), data[[2, 0]])
        assert err == "" and cache.rejected == []
    else:
        assert got == [None, None] and cache.rejected == [base] and "c" not in cache
        assert f"segment {base}.f32 can no longer be read" in err and err.count("\n") == 1


def test_rows_are_buffered_into_segments(tmp_path) -> None:
    cache = FeatureCache("ns", tmp_path, segment_rows=4)
    data = rows(7)
    for i in range(7):
        cache.put_many([str(i)], data[i:i + 1])
    assert len([f for f in os.listdir(tmp_path / "ns") if f.endswith(".json")]) == 1  # 4 rows written, 3 buffered
    crashed = FeatureCache("ns", tmp_path)  # a process dying now loses only the buffer
    assert [r is not None for r in crashed.get_many([str(i) for i in range(7)])] == [True] * 4 + [False] * 3
    cache.flush()
    np.testing.assert_array_equal(np.stack(FeatureCache("ns", tmp_path).get_many([str(i) for i in range(7)])), data)


def test_trainer_fills_a_disk_cache_that_the_next_run_reuses(tiny_tod, tiny_split, tmp_path) -> None:
    from edgetune.runtime import Trainer

    path, ctx = tiny_tod(), Context(cache_dir=tmp_path)
    split = tiny_split(30)
    feats = Trainer(TrainSession.create(path, ctx), split).features(split)
    assert split.decoded == 30
    again = Trainer(TrainSession.create(path, ctx), split)
    np.testing.assert_array_equal(again.features(split), feats)
    again.fit(5)
    assert split.decoded == 30  # the second run decoded no image at all


def test_keys_and_namespace() -> None:
    x = np.zeros((2, 3, 4, 4), np.float32)
    x[1, 0, 0, 0] = 1
    k = content_keys(x)
    assert k[0] != k[1] and k == content_keys(x.copy())
    assert content_keys(x[:1]) != content_keys(x[:1].reshape(1, 3, 2, 8))
    pre = {"mean": [127.0] * 3}
    assert namespace_for("aa", pre, "features") != namespace_for("ab", pre, "features")
    assert namespace_for("aa", pre, "features") != namespace_for("aa", {"mean": [0.0] * 3}, "features")


def test_session_reuses_a_disk_cache_and_never_a_stale_one(tiny_tod, tmp_path, monkeypatch) -> None:
    x = np.random.default_rng(0).normal(size=(5, 3, 8, 8)).astype(np.float32)
    ctx = Context(cache_dir=tmp_path)
    first = TrainSession.create(tiny_tod(seed=0), ctx)
    feats = first.extract_features(x, keys=list("abcde"))
    first.feature_cache.flush()

    again = TrainSession.create(tiny_tod(seed=0), ctx)  # same frozen graph: no backbone run at all
    monkeypatch.setattr(again.frozen, "run", lambda data: pytest.fail("cache miss"))
    np.testing.assert_array_equal(again.extract_features(x, keys=list("abcde")), feats)

    other = TrainSession.create(tiny_tod(seed=1), ctx)  # different frozen weights, same sample keys
    assert other.model_sha256 != first.model_sha256
    fresh = other.extract_features(x, keys=list("abcde"))
    uncached = TrainSession.create(tiny_tod(seed=1), Context(cache=False))
    np.testing.assert_array_equal(fresh, uncached.extract_features(x))
    assert not np.allclose(fresh, feats)


def test_cache_off_stores_nothing(tiny_tod) -> None:
    sess = TrainSession.create(tiny_tod(), Context(cache=False))
    x = np.ones((3, 3, 8, 8), np.float32)
    a = sess.extract_features(x)
    assert sess.frozen._cache is None
    np.testing.assert_array_equal(a, TrainSession.create(tiny_tod()).extract_features(x))


@pytest.mark.parametrize("error", [PermissionError(13, "Permission denied"), OSError(5, "Input/output error")])
def test_unreadable_segments_are_reported_as_what_they_are(tmp_path, capsys, monkeypatch, error: OSError) -> None:
    """No permission or an I/O error is not a damaged segment: the warning says what happened (this
    runs as root, which reads any file, so `open` is made to fail the way the kernel would)."""
    from edgetune.runtime import safe_read

    FeatureCache("ns", tmp_path, segment_rows=2).put_many(["a", "b"], rows(2))
    base = _segment(tmp_path)
    real_open = os.open

    def failing_open(path, *args, **kwargs):  # every cache file is opened through safe_read's os.open
        if str(path).endswith(".f32"):
            raise error
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(safe_read.os, "open", failing_open)
    cache = FeatureCache("ns", tmp_path, width=5)
    assert cache.get_many(["a", "b"]) == [None, None] and cache.rejected == [base]
    err = capsys.readouterr().err
    assert f"cannot read segment {base}.json ({error.strerror})" in err and "damaged" not in err


# --- the memory budget: past it, the cache goes to disk by itself -------------------------------------

def test_cache_over_its_budget_spills_to_segments_and_cleans_up(tmp_path) -> None:
    import gc

    data = rows(9)
    cache = FeatureCache("ns", None, width=5, budget=4 * data[0].nbytes, segment_rows=2)
    cache.put_many(list("abcd"), data[:4])  # exactly the budget: still in memory
    assert not cache.spilled and cache.directory is None
    cache.put_many(list("efghi"), data[4:])
    assert cache.spilled and os.path.isdir(cache.directory)
    cache.flush()
    segments = [f for f in os.listdir(cache.directory) if f.endswith(".f32")]
    assert sum(os.path.getsize(os.path.join(cache.directory, f)) for f in segments) == data.nbytes
    got = cache.get_many(list("abcdefghi"))
    np.testing.assert_array_equal(np.stack(got), data)
    root = os.path.dirname(cache.directory)
    del cache, got
    gc.collect()
    assert not os.path.exists(root)  # the private spill folder goes with the cache


def test_spill_into_a_given_folder_reuses_what_is_there(tmp_path) -> None:
    data = rows(4)
    first = FeatureCache("ns", None, budget=0, spill_dir=tmp_path)
    first.put_many(list("ab"), data[:2])
    first.flush()
    second = FeatureCache("ns", None, budget=0, spill_dir=tmp_path)
    second.put_many(list("bc"), data[1:3])
    second.flush()
    assert len(second) == 3 and len(FeatureCache("ns", tmp_path)) == 3  # "b" written once, "a" found


@pytest.mark.parametrize("budget_rows", [0, 7])
def test_training_is_identical_with_the_cache_in_memory_or_spilled(tiny_tod, tiny_split, budget_rows) -> None:
    from edgetune.runtime.trainer import Trainer
    from tests.fixtures_runtime import TINY_FEATURES

    path = tiny_tod(head="mlp")
    runs = []
    for budget in (None, budget_rows * TINY_FEATURES * 4):
        session = TrainSession.create(path, Context(threads=1, cache_budget=budget))
        train, test = tiny_split(40), tiny_split(12, seed=5, name="test")
        losses = []
        trainer = Trainer(session, train, test, test_every=4, target_accuracy=None)
        trainer.features(train)
        for _ in range(10):
            trainer.fit(1)
            losses.append(session.loss)
        runs.append((losses, session.parameters(), session.record["best_test_accuracy"],
                     session.feature_cache.spilled))
    (l0, p0, a0, s0), (l1, p1, a1, s1) = runs
    assert not s0 and s1  # the second run went to disk
    assert l0 == l1 and a0 == a1 and all(np.array_equal(p0[k], p1[k]) for k in p0)
