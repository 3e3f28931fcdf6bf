"""Training callbacks: observers the `Trainer` tells what happened. They print, log and schedule; they never steer.

The `Trainer` owns the loop's decisions (when to evaluate, when to save, when to stop); a callback
overrides any hook of `Callback` (each does nothing by default) and is given the session. The
seed's net_runner output is `LossMonitor` + `AccuracyMonitor`, line for line (`%g` = C++
iostream's default float format, 6 significant digits). A learning-rate schedule is a callback that
sets the rate for the next step through the session's public setter.

This module imports nothing else of the runtime but `meta` (which schedule names a model may carry),
so the trainer can import it without a cycle.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import TYPE_CHECKING, TextIO

from edgetune.errors import UserError
from edgetune.runtime.meta import check_schedule

if TYPE_CHECKING:  # annotations only; session.py imports no callback
    from edgetune.runtime.session import TrainSession


class Callback:
    """Base: every hook does nothing. Hooks are called in the order the callbacks were given."""

    def on_train_begin(self, session: TrainSession) -> None:
        """Before the first step of `Trainer.fit`."""

    def on_step(self, session: TrainSession, step: int, loss: float) -> None:
        """After optimizer step `step` (counted over the model's life, from 1) with its loss."""

    def on_evaluate(self, session: TrainSession, split: str, accuracy: float) -> None:
        """After an accuracy measurement on a split ("test", "validation", ...)."""

    def on_save(self, session: TrainSession, path: str) -> None:
        """After the trainer saved a checkpoint to `path`."""

    def on_restore(self, session: TrainSession, step: int, accuracy: float) -> None:
        """After the trainer went back to the state of `step` (keep-best: its test accuracy was the best)."""

    def on_train_end(self, session: TrainSession) -> None:
        """After the last step of `fit` (not called when training raised)."""


class LossMonitor(Callback):
    """Prints the seed's `i: Loss is X [min=Y]` after every step.

    `i` is the model's step count (a resumed run continues the numbering); the minimum starts at
    infinity where the seed starts it at 1000 (so a loss above 1000 is shown as its own minimum).
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream
        self.min_loss = math.inf

    def on_step(self, session: TrainSession, step: int, loss: float) -> None:
        self.min_loss = min(self.min_loss, loss)
        print(f"{step}: Loss is {loss:g} [min={self.min_loss:g}]", file=self.stream or sys.stdout, flush=True)


class AccuracyMonitor(Callback):
    """Prints the seed's `accuracy on test data = A max accuracy = M` after each test evaluation."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream
        self.max_accuracy = 0.0

    def on_evaluate(self, session: TrainSession, split: str, accuracy: float) -> None:
        if split != "test":
            return
        self.max_accuracy = max(self.max_accuracy, accuracy)
        print(f"accuracy on test data = {accuracy:g} max accuracy = {self.max_accuracy:g}",
              file=self.stream or sys.stdout, flush=True)

    def on_restore(self, session: TrainSession, step: int, accuracy: float) -> None:
        print(f"kept the weights of step {step} (best test accuracy {accuracy:g})", file=self.stream or sys.stdout,
              flush=True)


class _Schedule(Callback):
    """A learning-rate schedule: `lr = rate(step, base_lr)`, set before each step.

    The base rate is the session's `base_learning_rate()`, kept in its record so a resumed run
    follows the same curve.
    """

    def rate(self, step: int, base: float) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def on_train_begin(self, session: TrainSession) -> None:
        self.base = session.base_learning_rate()
        session.learning_rate = self.rate(session.step, self.base)

    def on_step(self, session: TrainSession, step: int, loss: float) -> None:
        session.learning_rate = self.rate(step, self.base)


class StepLR(_Schedule):
    """`base * gamma ** (step // step_size)` (torch StepLR, counted in steps)."""

    def __init__(self, step_size: int, gamma: float = 0.1) -> None:
        if int(step_size) < 1:
            raise ValueError(f"step_size must be >= 1, got {step_size}")
        self.step_size, self.gamma = int(step_size), float(gamma)

    def rate(self, step: int, base: float) -> float:
        return base * self.gamma ** (step // self.step_size)


class LinearLR(_Schedule):
    """Factor going linearly from `start_factor` to `end_factor` over `total_steps`, then constant."""

    def __init__(self, total_steps: int, start_factor: float = 1.0, end_factor: float = 0.0) -> None:
        if int(total_steps) < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.total, self.start, self.end = int(total_steps), float(start_factor), float(end_factor)

    def rate(self, step: int, base: float) -> float:
        return base * (self.start + (self.end - self.start) * min(step, self.total) / self.total)


class CosineLR(_Schedule):
    """Cosine annealing from the base rate to `min_lr` over `total_steps` (torch CosineAnnealingLR).

    The curve starts at model step `start` (0: a run's curve over model steps, which a resume
    follows; a session's current step: a new curve for a run that continues a checkpoint).
    """

    def __init__(self, total_steps: int, min_lr: float = 0.0, start: int = 0) -> None:
        if int(total_steps) < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.total, self.min_lr, self.start = int(total_steps), float(min_lr), int(start)

    def rate(self, step: int, base: float) -> float:
        t = min(max(step - self.start, 0), self.total) / self.total
        return self.min_lr + (base - self.min_lr) * (1 + math.cos(math.pi * t)) / 2


class Warmup(_Schedule):
    """Linear warm-up over the first `steps` steps of the model's life (the rate of step i is base * i / steps),
    then `then`'s rate (constant when None): large early updates on a fresh head are what warm-up tames."""

    def __init__(self, steps: int, then: _Schedule | None = None) -> None:
        if int(steps) < 1:
            raise ValueError(f"warm-up steps must be >= 1, got {steps}")
        self.steps, self.then = int(steps), then

    def rate(self, step: int, base: float) -> float:
        if step < self.steps:  # `step` steps are done: this is the rate of step `step + 1`
            return base * (step + 1) / self.steps
        return self.then.rate(step, base) if self.then is not None else base


def make_schedule(name: str, total_steps: int, warmup: int = 0) -> _Schedule | None:
    """The schedule `--schedule NAME --warmup N` asks for, over a run ending at model step `total_steps`.

    `cosine` anneals to 0 at `total_steps`; `step` divides the rate by 10 at each third of it;
    `constant` keeps it. A warm-up comes first when `warmup` > 0. None: nothing to schedule.

    Raises:
        UserError: an unknown name, or a warm-up that is negative or not shorter than the run.
    """
    check_schedule(name)
    if warmup < 0 or (warmup and warmup >= total_steps):
        raise UserError(f"--warmup must be >= 0 and shorter than the run ({total_steps} steps), got {warmup}")
    total = max(int(total_steps), 1)
    schedule = {"constant": None, "cosine": CosineLR(total), "step": StepLR(max(total // 3, 1))}[name]
    return Warmup(warmup, schedule) if warmup else schedule


class JsonlLogger(Callback):
    """Appends one JSON object per step and per evaluation to `path` (machine-readable training log)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)

    def _write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def on_step(self, session: TrainSession, step: int, loss: float) -> None:
        self._write({"event": "step", "step": step, "loss": loss, "lr": session.learning_rate})

    def on_evaluate(self, session: TrainSession, split: str, accuracy: float) -> None:
        self._write({"event": "evaluate", "step": session.step, "split": split, "accuracy": accuracy})

    def on_restore(self, session: TrainSession, step: int, accuracy: float) -> None:
        self._write({"event": "restore", "step": step, "test_accuracy": accuracy})
