"""Small composable training callbacks, as MindSpore Lite added after the seed.

A callback overrides any of the hooks; to stop training it sets `trainer.stop = True`. The seed's
net_runner output is `LossMonitor` + `AccuracyMonitor`, line for line (`%g` = C++ iostream's
default float format, 6 significant digits).
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import TYPE_CHECKING, TextIO

from edgetune.errors import UserError

if TYPE_CHECKING:
    from edgetune.runtime.trainer import Trainer


class Callback:
    """Base: every hook does nothing."""

    def on_train_begin(self, trainer: Trainer) -> None:
        """Before the first step of `fit`."""

    def on_step_end(self, trainer: Trainer, step: int, loss: float) -> None:
        """After optimizer step `step` (counted over the model's life, from 1)."""

    def on_evaluate(self, trainer: Trainer, split_name: str, accuracy: float) -> None:
        """After an accuracy measurement on a split."""

    def on_train_end(self, trainer: Trainer) -> None:
        """After the last step of `fit` (not called when training raised)."""


class LossMonitor(Callback):
    """Prints the seed's `i: Loss is X [min=Y]` after every step.

    `i` is the model's step count (a resumed run continues the numbering); the minimum starts at
    infinity where the seed starts it at 1000 (so a loss above 1000 is shown as its own minimum).
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream
        self.min_loss = math.inf

    def on_step_end(self, trainer: Trainer, step: int, loss: float) -> None:
        self.min_loss = min(self.min_loss, loss)
        print(f"{step}: Loss is {loss:g} [min={self.min_loss:g}]", file=self.stream or sys.stdout, flush=True)


class AccuracyMonitor(Callback):
    """Test accuracy every `every` steps: prints the seed's line, stops when it is above `target`.

    Args:
        every: evaluate on the trainer's test split every this many steps (the trainer's own
            `test_every` evaluations are printed too; one step is never evaluated twice).
        target: stop once an accuracy is above it (None: never).
    """

    def __init__(self, every: int = 20, target: float | None = 0.9, stream: TextIO | None = None) -> None:
        self.every, self.target, self.stream = int(every), target, stream
        self.max_accuracy = 0.0

    def on_step_end(self, trainer: Trainer, step: int, loss: float) -> None:
        if trainer.test is not None and self.every and step % self.every == 0:
            trainer.evaluate("test")

    def on_evaluate(self, trainer: Trainer, split_name: str, accuracy: float) -> None:
        if split_name != "test":
            return
        self.max_accuracy = max(self.max_accuracy, accuracy)
        print(f"accuracy on test data = {accuracy:g} max accuracy = {self.max_accuracy:g}",
              file=self.stream or sys.stdout, flush=True)
        if self.target is not None and accuracy > self.target:
            trainer.stop = True


class CheckpointSaver(Callback):
    """Saves a full checkpoint every `every` steps, as the seed's `-s`.

    Args:
        every: steps between checkpoints.
        pattern: output path with a `{step}` field; default `<model>_trained_{step}.tod` next to
            the file the session was loaded from. The default is never built from `meta["name"]`:
            that is text from inside the model file (it could hold `../` or `/`), and saving
            there would put files where nobody asked for them.
    """

    def __init__(self, every: int, pattern: str | os.PathLike | None = None) -> None:
        if int(every) < 1:
            raise ValueError(f"checkpoint interval must be >= 1, got {every}")
        self.every, self.pattern = int(every), None if pattern is None else os.fspath(pattern)
        self.saved: list[str] = []

    def on_train_begin(self, trainer: Trainer) -> None:
        if self.pattern is None and trainer.session.path is None:  # refuse before any step, not at the first save
            raise UserError("CheckpointSaver needs a pattern for a session not loaded from a file")

    def on_step_end(self, trainer: Trainer, step: int, loss: float) -> None:
        if step % self.every:
            return
        pattern = self.pattern
        if pattern is None:
            stem = os.path.splitext(trainer.session.path)[0]
            pattern = stem.replace("{", "{{").replace("}", "}}") + "_trained_{step}.tod"
        self.saved.append(trainer.session.save(pattern.format(step=step)))


class _Schedule(Callback):
    """A learning-rate schedule: `lr = rate(step, base_lr)`, set before each step.

    The base rate is kept in `record["base_lr"]` so a resumed run follows the same curve.
    """

    def rate(self, step: int, base: float) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def on_train_begin(self, trainer: Trainer) -> None:
        sess = trainer.session
        self.base = float(sess.record.setdefault("base_lr", sess.learning_rate))
        sess.learning_rate = self.rate(sess.step, self.base)

    def on_step_end(self, trainer: Trainer, step: int, loss: float) -> None:
        trainer.session.learning_rate = self.rate(step, self.base)


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
    """Cosine annealing from the base rate to `min_lr` over `total_steps` (torch CosineAnnealingLR)."""

    def __init__(self, total_steps: int, min_lr: float = 0.0) -> None:
        if int(total_steps) < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.total, self.min_lr = int(total_steps), float(min_lr)

    def rate(self, step: int, base: float) -> float:
        t = min(step, self.total) / self.total
        return self.min_lr + (base - self.min_lr) * (1 + math.cos(math.pi * t)) / 2


class JsonlLogger(Callback):
    """Appends one JSON object per step and per evaluation to `path` (machine-readable training log)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)

    def _write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def on_step_end(self, trainer: Trainer, step: int, loss: float) -> None:
        self._write({"event": "step", "step": step, "loss": loss, "lr": trainer.session.learning_rate})

    def on_evaluate(self, trainer: Trainer, split_name: str, accuracy: float) -> None:
        self._write({"event": "evaluate", "step": trainer.session.step, "split": split_name, "accuracy": accuracy})
