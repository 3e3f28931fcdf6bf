"""Callbacks: the seed's output lines, observers that never steer, schedules against torch, JSONL log;
the trainer's checkpoints and the hooks it calls, in order."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch

from edgetune.errors import UserError
from edgetune.runtime import (AccuracyMonitor, Callback, Context, CosineLR, JsonlLogger, LinearLR, LossMonitor, StepLR,
                              Trainer, TrainSession)
from tests.fixtures_runtime import tiny_model


@pytest.mark.parametrize("loss, text", [(5.02998, "5.02998"), (0.000215514, "0.000215514"), (3.0, "3"),
                                        (1234567.0, "1.23457e+06"), (0.1290921, "0.129092")])
def test_loss_monitor_formats_like_cpp_iostream(loss: float, text: str) -> None:
    out = io.StringIO()
    LossMonitor(out).on_step(None, 7, float(np.float32(loss)))
    assert out.getvalue() == f"7: Loss is {text} [min={text}]\n"


def test_seed_output_line_for_line(tiny_tod, tiny_split) -> None:
    """LossMonitor + AccuracyMonitor print exactly the seed's TrainLoop lines."""
    out = io.StringIO()
    sess = TrainSession.create(tiny_tod())
    test = tiny_split(9, seed=2, name="test")
    trainer = Trainer(sess, tiny_split(20), test, test_every=3, target_accuracy=None,
                      callbacks=[LossMonitor(out), AccuracyMonitor(stream=out)])
    losses = []
    trainer.callbacks.append(type("Rec", (Callback,), {"on_step": lambda s, sess, i, l: losses.append(l)})())
    trainer.fit(7)
    accs = [float(l.split()[5]) for l in out.getvalue().splitlines() if l.startswith("accuracy")]
    expected, low, best = [], math.inf, 0.0
    for i, loss in enumerate(losses, 1):
        low = min(low, loss)
        expected.append(f"{i}: Loss is {loss:g} [min={low:g}]")
        if i % 3 == 0:
            acc = accs[len([e for e in expected if e.startswith("accuracy")])]
            best = max(best, acc)
            expected.append(f"accuracy on test data = {acc:g} max accuracy = {best:g}")
    assert out.getvalue().splitlines() == expected and len(accs) == 2
    assert accs[-1] == pytest.approx(trainer.accuracy(test), abs=1e-6)


class Hooks(Callback):
    """Records every hook call as (hook, step, detail)."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def on_train_begin(self, session) -> None:
        self.calls.append(("begin", session.step))

    def on_step(self, session, step: int, loss: float) -> None:
        self.calls.append(("step", step))

    def on_evaluate(self, session, split: str, accuracy: float) -> None:
        self.calls.append(("evaluate", session.step, split))

    def on_save(self, session, path: str) -> None:
        self.calls.append(("save", session.step, path))

    def on_train_end(self, session) -> None:
        self.calls.append(("end", session.step))


def test_trainer_owns_evaluation_saving_and_stopping(tiny_tod, tiny_split) -> None:
    """Per step: the step, its evaluation when due, its checkpoint when due (holding that evaluation),
    then the stop; callbacks are told, in that order, and an AccuracyMonitor only prints."""
    path = tiny_tod()
    out, hooks = io.StringIO(), Hooks()
    sess = TrainSession.create(path)
    trainer = Trainer(sess, tiny_split(20), tiny_split(9, name="test"), test_every=2, target_accuracy=-0.5,
                      save_every=2, callbacks=[hooks, AccuracyMonitor(stream=out)]).fit(10)
    ckpt = path[: -len(".tod")] + "_trained_2.tod"
    assert hooks.calls == [("begin", 0), ("step", 1), ("step", 2), ("evaluate", 2, "test"), ("save", 2, ckpt),
                           ("end", 2)]
    assert sess.step == 2 and trainer.stop and trainer.saved == [ckpt]
    assert out.getvalue().startswith("accuracy on test data = ")
    assert TrainSession.create(ckpt).record["best_test_accuracy"] == sess.record["best_test_accuracy"]
    with pytest.raises(TypeError):
        AccuracyMonitor(every=2)  # no cadence or target of its own: the trainer owns them


def test_checkpoint_default_names(tiny_tod, tiny_split) -> None:
    path = tiny_tod()
    sess = TrainSession.create(path)
    trainer = Trainer(sess, tiny_split(20), save_every=2).fit(5)
    stem = path[: -len(".tod")]
    assert trainer.saved == [f"{stem}_trained_2.tod", f"{stem}_trained_4.tod"]
    assert TrainSession.create(trainer.saved[1]).step == 4


def test_checkpoints_are_never_named_from_meta(tiny_split) -> None:
    """A session built in memory has no file to name checkpoints after; meta["name"] is text from
    inside the model (here a path escape) and must not become a path: refused before any step."""
    tod = tiny_model()
    tod.meta["name"] = "../../escaped"
    sess = TrainSession(tod, Context())
    with pytest.raises(UserError, match="need a checkpoint_pattern"):
        Trainer(sess, tiny_split(20), save_every=1).fit(2)
    assert sess.step == 0


@pytest.mark.parametrize("ours, theirs", [
    (lambda: StepLR(3, gamma=0.5), lambda o: torch.optim.lr_scheduler.StepLR(o, 3, gamma=0.5)),
    (lambda: LinearLR(6, start_factor=0.25, end_factor=1.0),
     lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.25, end_factor=1.0, total_iters=6)),
    (lambda: CosineLR(8, min_lr=0.001), lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 8, eta_min=0.001)),
])
def test_schedules_match_torch_per_step(ours, theirs) -> None:
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched, ref = ours(), theirs(opt)
    for step in range(9):  # to the end of the cosine (torch then rises again; ours stays at min_lr)
        assert sched.rate(step, 0.1) == pytest.approx(ref.get_last_lr()[0], rel=1e-9, abs=1e-12)
        opt.step()
        ref.step()


def test_a_cosine_with_a_start_is_the_same_curve_shifted_to_that_step() -> None:
    shifted, plain = CosineLR(8, min_lr=0.001, start=30), CosineLR(8, min_lr=0.001)
    assert [shifted.rate(30 + s, 0.1) for s in range(10)] == [plain.rate(s, 0.1) for s in range(10)]
    assert shifted.rate(29, 0.1) == 0.1  # before its start: the base rate


def test_schedule_drives_the_session_and_logger_records_it(tiny_tod, tiny_split, tmp_path) -> None:
    sess = TrainSession.create(tiny_tod())
    log = tmp_path / "log.jsonl"
    Trainer(sess, tiny_split(20), tiny_split(6, name="test"), test_every=2, target_accuracy=None,
            callbacks=[JsonlLogger(log), StepLR(2, gamma=0.1)]).fit(4)
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    steps = [r for r in rows if r["event"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert [r["lr"] for r in steps] == pytest.approx([0.05, 0.05, 0.005, 0.005])  # lr used by each step
    assert [r["loss"] for r in steps] == [pytest.approx(r["loss"]) for r in steps] and all(
        math.isfinite(r["loss"]) for r in steps)
    evals = [r for r in rows if r["event"] == "evaluate"]
    assert [(r["step"], r["split"]) for r in evals] == [(2, "test"), (4, "test")]
    assert sess.learning_rate == pytest.approx(0.0005) and sess.record["base_lr"] == 0.05
