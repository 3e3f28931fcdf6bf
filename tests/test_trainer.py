"""Trainer on the tiny model: data order, exact resume, cache exactness, streaming, divergence."""

from __future__ import annotations

import re

import numpy as np
import pytest

from edgetune.errors import UserError
from edgetune.runtime import Callback, Context, CosineLR, Trainer, TrainingDiverged, TrainSession
from edgetune.runtime import format as tod_format


class RecordingSplit:
    """Wraps a split and records every batch of indices decoded."""

    def __init__(self, split) -> None:
        self.split, self.name, self.labels, self.keys = split, split.name, split.labels, split.keys
        self.calls: list[list[int]] = []

    def __len__(self) -> int:
        return len(self.split)

    def images(self, indices):
        self.calls.append([int(i) for i in indices])
        return self.split.images(indices)


def test_epochs_are_seeded_permutations(tiny_tod, tiny_split) -> None:
    split = RecordingSplit(tiny_split(10))
    sess = TrainSession.create(tiny_tod(batch_size=4), Context(cache=False))
    Trainer(sess, split, seed=3, test_every=0).fit(6)  # 10 // 4 = 2 full batches per epoch, tail dropped
    rng = np.random.Generator(np.random.PCG64(3))
    expected = []
    for _ in range(3):
        perm = rng.permutation(10)
        expected += [perm[:4].tolist(), perm[4:8].tolist()]
    assert split.calls == expected
    assert sess.record["seed"] == 3 and sess.record["data_cursor"] == 8


@pytest.mark.parametrize("head", ["mlp", "dense"])
def test_resume_from_checkpoint_is_bit_identical(tiny_tod, tiny_split, tmp_path, head: str) -> None:
    """4 steps + checkpoint + a new process's worth of objects + 7 steps == 11 uninterrupted steps."""
    path = tiny_tod(head=head, batch_size=4)
    train, test = tiny_split(14, seed=1), tiny_split(9, seed=2, name="test")

    full = TrainSession.create(path)
    Trainer(full, train, test, seed=5, test_every=3, target_accuracy=None, callbacks=[CosineLR(11)]).fit(11)

    part = TrainSession.create(path)
    saving = Trainer(part, train, test, seed=5, test_every=3, target_accuracy=None, callbacks=[CosineLR(11)],
                     save_every=4, checkpoint_pattern=tmp_path / "ckpt_{step}.tod").fit(5)
    assert saving.saved == [str(tmp_path / "ckpt_4.tod")]
    resumed = TrainSession.create(saving.saved[0], Context(cache=False))
    Trainer(resumed, train, test, seed=999, test_every=3, target_accuracy=None, callbacks=[CosineLR(11)]).fit(7)

    assert resumed.step == full.step == 11
    for name, p in full.params.items():
        np.testing.assert_array_equal(resumed.params[name].data, p.data)
    assert resumed.learning_rate == full.learning_rate
    # the two final checkpoints are the same bytes: params, slots, lr, record, RNG states
    a, b = full.save(tmp_path / "full.tod"), resumed.save(tmp_path / "resumed.tod")
    assert open(a, "rb").read() == open(b, "rb").read()


def test_cache_gives_the_same_losses_and_decodes_each_image_once(tiny_tod, tiny_split) -> None:
    path = tiny_tod(head="mlp", batch_size=4)
    losses = {}
    for cache in (True, False):
        train = RecordingSplit(tiny_split(12))
        test = RecordingSplit(tiny_split(7, seed=4, name="test"))
        sess = TrainSession.create(path, Context(cache=cache))
        seen: list[float] = []
        Trainer(sess, train, test, test_every=2, target_accuracy=None,
                callbacks=[_LossRecorder(seen)]).fit(15)
        losses[cache] = seen
        decoded = sum(len(c) for c in train.calls)
        if cache:
            assert decoded == 12 and sum(len(c) for c in test.calls) == 7
            assert len(sess.feature_cache) == 19
        else:
            assert decoded == 15 * 4
    assert losses[True] == losses[False]


class _LossRecorder(Callback):
    def __init__(self, out: list[float]) -> None:
        self.out = out

    def on_step(self, session, step: int, loss: float) -> None:
        self.out.append(loss)


def test_after_callback_sees_each_training_step(tiny_tod, tiny_split) -> None:
    seen = []
    sess = TrainSession.create(tiny_tod())
    Trainer(sess, tiny_split(20), after_callback=seen.append).fit(3)
    assert len(seen) == 3 and all(set(o) == {"loss", "logits"} and o["logits"].shape == (4, 3) for o in seen)
    assert float(seen[-1]["loss"]) == sess.loss


def test_accuracy_counts_every_sample(tiny_tod, tiny_split) -> None:
    split = tiny_split(70, seed=6, name="test")  # 64 + a partial chunk of 6
    sess = TrainSession.create(tiny_tod())
    trainer = Trainer(sess, split)
    acc = trainer.accuracy(split)
    logits = sess.eval().run_graph(split.images(range(70)))["logits"]
    assert acc == (logits.argmax(1) == split.labels).sum() / 70
    assert sess.training is False  # accuracy restored the mode it found (eval, set by the line above)


def test_training_learns_the_tiny_task(tiny_tod, tiny_split) -> None:
    sess = TrainSession.create(tiny_tod(head="dense", batch_size=8))
    train, test = tiny_split(60, seed=1), tiny_split(30, seed=2, name="test")
    trainer = Trainer(sess, train, test, test_every=0)
    before = trainer.accuracy(test)
    trainer.fit(80)
    after = trainer.evaluate("test")
    assert after >= before + 0.2 and after > 0.7, (before, after)
    assert sess.record["best_test_accuracy"] == after


def test_target_accuracy_stops_training(tiny_tod, tiny_split) -> None:
    sess = TrainSession.create(tiny_tod())
    trainer = Trainer(sess, tiny_split(20), tiny_split(10, seed=2, name="test"), test_every=2, target_accuracy=-1.0)
    trainer.fit(50)
    assert sess.step == 2 and trainer.stop


def test_features_stream_in_batches(tiny_tod, tiny_split) -> None:
    split = RecordingSplit(tiny_split(150))
    progress = []
    sess = TrainSession.create(tiny_tod(), Context(cache=False, feature_batch=5))
    feats = Trainer(sess, split, progress=lambda *a: progress.append(a)).features(split)
    assert feats.shape == (150, 8) and max(len(c) for c in split.calls) == 5 and sum(map(len, split.calls)) == 150
    np.testing.assert_array_equal(feats, sess.extract_features(split.split.images(range(150))))
    assert progress[-1] == ("features train", 150, 150)


@pytest.mark.filterwarnings("ignore:overflow encountered", "ignore:invalid value encountered")
def test_divergence_raises_and_saves_no_bad_weights(tiny_tod, tiny_split, tmp_path) -> None:
    path = tiny_tod(head="mlp", optimizer={"name": "sgd", "lr": 1e20, "momentum": 0.0, "dampening": 0.0,
                                          "weight_decay": 0.0, "nesterov": False})
    sess = TrainSession.create(path)
    trainer = Trainer(sess, tiny_split(40), save_every=1, checkpoint_pattern=tmp_path / "c_{step}.tod")
    with pytest.raises(TrainingDiverged, match=r"training diverged at step (\d+): .*lower --lr") as info:
        trainer.fit(20)
    bad_step = int(re.search(r"step (\d+)", str(info.value)).group(1))
    assert sess.step == bad_step - 1 == len(trainer.saved)
    for p in trainer.saved:
        assert all(np.isfinite(t).all() for t in tod_format.load_file(p).tensors.values())


def test_bad_arguments(tiny_tod, tiny_split) -> None:
    sess = TrainSession.create(tiny_tod())
    with pytest.raises(UserError, match="empty"):
        Trainer(sess, tiny_split(0))
    with pytest.raises(UserError, match="no validation split"):
        Trainer(sess, tiny_split(5)).evaluate("validation")


SEED_RUN = """
import re, sys
from edgetune.runtime import AccuracyMonitor, Context, LossMonitor, Trainer, TrainSession
from edgetune.runtime.dataset import load_dataset
sess = TrainSession.create(sys.argv[1], Context())
ds = load_dataset(sys.argv[2], sess.preprocessing, num_classes=sess.num_classes)
Trainer(sess, ds.train, ds.test, callbacks=[LossMonitor(), AccuracyMonitor()]).fit(100)
status = open("/proc/self/status").read()
print("peak_rss_mb", int(re.search(r"VmHWM:\\s+(\\d+)", status).group(1)) // 1024)
"""


@pytest.mark.slow
def test_seed_run_on_lite0_fits_in_250_mb(lite0_tod, fashion_dir) -> None:
    """The seed's run (1000 images, 100 cycles, test every 20) in a fresh process: peak RSS <= 250 MB,
    the seed's output lines, and it learns (Fashion-MNIST through Lite0 features: > 60% vs 10% chance)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", SEED_RUN, str(lite0_tod), str(fashion_dir)],
                          capture_output=True, text=True, check=True, timeout=600)
    lines = done.stdout.splitlines()
    losses = [line for line in lines if re.fullmatch(r"\d+: Loss is [-+.e\d]+ \[min=[-+.e\d]+\]", line)]
    accs = [float(m.group(1)) for line in lines
            if (m := re.fullmatch(r"accuracy on test data = ([.\d]+) max accuracy = [.\d]+", line))]
    assert len(losses) + len(accs) + 1 == len(lines) and losses[0].startswith("1: Loss is ")
    assert max(accs) > 0.6, accs
    assert int(lines[-1].split()[1]) <= 250, lines[-1]
