"""Trainer on the tiny model: data order, exact resume, cache exactness, streaming, divergence."""

from __future__ import annotations

import re

import numpy as np
import pytest

from edgetune.errors import UserError
from edgetune.runtime import Callback, Context, CosineLR, Trainer, TrainingDiverged, TrainSession
from edgetune.runtime import format as tod_format
from tests.fixtures_runtime import RecordingSplit


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


def test_upcoming_names_the_images_the_next_steps_draw_without_drawing_them(tiny_tod, tiny_split) -> None:
    split = RecordingSplit(tiny_split(30))
    sess = TrainSession.create(tiny_tod(batch_size=4), Context(cache=False))
    trainer = Trainer(sess, split, seed=5, test_every=0)
    trainer.fit(2)  # mid-epoch: the next steps cross into a new permutation (7 batches of 4 per epoch)
    planned = trainer.upcoming(6)
    assert trainer.upcoming(6).tolist() == planned.tolist()  # asking draws nothing
    split.calls.clear()
    trainer.fit(6)
    assert planned.tolist() == sorted({i for call in split.calls for i in call})
    assert trainer.upcoming(8).tolist() == list(range(30))  # 8 x 4 >= 30: a whole pass


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


class Accuracies(Callback):
    """Records every test evaluation and restore the trainer tells."""

    def __init__(self) -> None:
        self.tests: list[tuple[int, float]] = []
        self.restored: list[tuple[int, float]] = []

    def on_evaluate(self, session, split: str, accuracy: float) -> None:
        if split == "test":
            self.tests.append((session.step, accuracy))

    def on_restore(self, session, step: int, accuracy: float) -> None:
        self.restored.append((step, accuracy))


def test_keep_best_restores_the_best_step_exactly(tiny_tod, tiny_split, tmp_path) -> None:
    """The kept state is the checkpoint a save at the best step writes (ties: the earlier step)."""
    path = tiny_tod(head="mlp", batch_size=4)
    train, test = tiny_split(14, seed=1), tiny_split(9, seed=2, name="test")
    plain = TrainSession.create(path)
    seen = Accuracies()
    trainer = Trainer(plain, train, test, seed=5, test_every=2, target_accuracy=None, callbacks=[seen],
                      save_every=2, checkpoint_pattern=str(tmp_path / "ck_{step}.tod"))
    trainer.fit(12)
    best_accuracy = max(a for _, a in seen.tests)
    best_step = min(s for s, a in seen.tests if a == best_accuracy)

    kept = TrainSession.create(path)
    seen = Accuracies()
    trainer = Trainer(kept, train, test, seed=5, test_every=2, target_accuracy=None, callbacks=[seen],
                      keep_best=True)
    trainer.fit(12)
    assert trainer.best == (best_step, best_accuracy)
    assert seen.restored == ([] if best_step == 12 else [(best_step, best_accuracy)])
    kept.save(tmp_path / "kept.tod")
    assert (tmp_path / "kept.tod").read_bytes() == (tmp_path / f"ck_{best_step}.tod").read_bytes()


def test_keep_best_evaluates_the_last_step_and_keeps_it_when_best(tiny_tod, tiny_split) -> None:
    sess = TrainSession.create(tiny_tod(batch_size=4))
    seen = Accuracies()
    trainer = Trainer(sess, tiny_split(14), tiny_split(9, seed=2, name="test"), test_every=5,
                      target_accuracy=None, callbacks=[seen], keep_best=True)
    trainer.fit(7)  # evaluated at 5 and, for keep-best, at the last step 7
    assert [s for s, _ in seen.tests] == [5, 7]
    assert trainer.best[0] in (5, 7) and sess.step == trainer.best[0]
    with pytest.raises(UserError, match="test split"):
        Trainer(sess, tiny_split(14), keep_best=True)


def test_restore_refuses_another_model(tiny_tod) -> None:
    a, b = TrainSession.create(tiny_tod(seed=0)), TrainSession.create(tiny_tod(seed=0))
    b.restore(a.checkpoint_state())  # the same frozen graph: fine
    state = a.checkpoint_state()
    state.frozen_graph = state.frozen_graph + b"\0"
    with pytest.raises(UserError, match="another model"):
        b.restore(state)


def test_weight_decay_is_settable_saved_and_checked(tiny_tod, tmp_path) -> None:
    sess = TrainSession.create(tiny_tod(head="dense"))
    sess.weight_decay = 0.25
    assert sess.weight_decay == 0.25
    sess.save(tmp_path / "wd.tod")
    assert TrainSession.create(tmp_path / "wd.tod").weight_decay == 0.25
    for bad in (-1.0, float("nan"), "0.1"):
        with pytest.raises(UserError, match="weight decay"):
            sess.weight_decay = bad


@pytest.mark.parametrize("name, warmup, rates", [
    ("constant", 0, None),
    ("cosine", 0, [1.0, 0.5, 0.0]),        # base at 0, half at 2, 0 at 4 (of 4 steps)
    ("step", 0, [1.0, 1.0, 0.1]),          # x0.1 each third: steps 0, 1 | 2, 3 with total 6 -> size 2
    ("constant", 2, [0.5, 1.0, 1.0]),
])
def test_schedules_from_their_names(name: str, warmup: int, rates) -> None:
    from edgetune.runtime.callbacks import make_schedule

    total = 6 if name == "step" else 4
    schedule = make_schedule(name, total, warmup)
    if rates is None:
        assert schedule is None
        return
    points = [0, 1, 2] if warmup else ([0, 2, 4] if name == "cosine" else [0, 1, 2])
    assert [pytest.approx(schedule.rate(s, 1.0)) for s in points] == rates


def test_bad_schedules_are_user_errors() -> None:
    from edgetune.runtime.callbacks import make_schedule

    with pytest.raises(UserError, match="unknown schedule"):
        make_schedule("linear", 10)
    with pytest.raises(UserError, match="warmup"):
        make_schedule("cosine", 10, 10)


NET_RUNNER_PEAK = """
import re, sys
from edgetune.cli import net_runner
code = net_runner.main(sys.argv[1:])
status = open("/proc/self/status").read()
print("peak_rss_mb", int(re.search(r"VmHWM:\\s+(\\d+)", status).group(1)) // 1024)
sys.exit(code)
"""


@pytest.mark.slow
def test_seed_run_fine_tuning_the_last_block_fits_in_250_mb(fashion_dir, tmp_path) -> None:
    """`--trainable last-block` (its Adam recipe, 2.3M trainable weights, 37 KB per cached image):
    the seed's run through net_runner in a fresh process peaks at <= 250 MB, as the head's does."""
    import subprocess
    import sys

    from edgetune.convert import convert
    from edgetune.host import TransferNet, create_backbone, default_head, export
    from edgetune.runtime.dataset import read_class_file

    names = [name for _folder, name in read_class_file(fashion_dir / "classes.txt")]
    backbone, info = create_backbone("efficientnet-lite0")
    net = TransferNet(backbone, default_head(info.features, len(names), seed=0))
    tod = convert(export(net, "last-block", class_names=names, batch_size=32, path=tmp_path / "lb.onnx"),
                  tmp_path / "lb")
    done = subprocess.run([sys.executable, "-c", NET_RUNNER_PEAK, "-f", str(tod), "-d", str(fashion_dir), "-c", "60",
                           "--target-accuracy", "1.01", "-q"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[-2].startswith("accuracy on validation data = ")
    assert int(lines[-1].split()[1]) <= 250, lines[-1]
