"""`Trainer`: the seed's train loop (net_runner's TrainLoop) over a session, a Split and callbacks.

The trainer owns every decision of the loop: the data order, when to evaluate (`test_every`), when
to save a checkpoint (`save_every`), when to stop (`target_accuracy`). Callbacks are told what
happened (`edgetune.runtime.callbacks`) and never steer. Each step runs in this order: the
optimizer step, `on_step` (the loss line), the test evaluation if due (`on_evaluate`: the accuracy
line), the checkpoint if due (so it holds that evaluation; `on_save`), then the stop if the target
was reached.

Data order is reproducible and resumable: epochs of a seeded PCG64 permutation of the train split,
with the generator state at the start of the current epoch and the position in it kept in the
session's record, so a checkpoint continues exactly where it stopped. Images are decoded only for
samples whose features are not cached yet, a batch at a time (never the whole set).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np

from edgetune.errors import UserError
from edgetune.runtime.callbacks import Callback
from edgetune.runtime.meta import check_mixup
from edgetune.runtime.mixup import mix
from edgetune.runtime.pipeline import prefetch
from edgetune.runtime.session import AfterCallback, TrainingDiverged, TrainSession

__all__ = ["Split", "Trainer", "TrainingDiverged"]

Progress = Callable[[str, int, int], None]  # (what, done, total)


class Split(Protocol):
    """What the trainer needs of a dataset split (edgetune.runtime.dataset.Split satisfies it)."""

    name: str
    labels: np.ndarray
    keys: list[str]

    def __len__(self) -> int: ...

    def images(self, indices: Sequence[int]) -> np.ndarray: ...


class Trainer:
    """Train a session's trainable part on a split, evaluating, saving and stopping as the seed's loop does.

    Args:
        session: the model; it is put in train mode by `fit` and eval mode while measuring accuracy.
        train: the split batches are drawn from.
        test: the split `test_every` evaluations run on (None: no periodic evaluation).
        callbacks: `Callback` objects, told of each step, evaluation and checkpoint, in order.
        seed: seeds the data order and dropout of a fresh run; a checkpoint whose record already
            holds a data-order state continues from that state instead.
        test_every: evaluate on `test` every this many steps (0: never).
        target_accuracy: stop once a test accuracy is above this (None: never), as the seed's 0.9.
        progress: called as `progress(what, done, total)` while streaming a split through the model.
        after_callback: passed to every training step's `run_head` (the seed's verbose mode).
        save_every: save a full checkpoint every this many steps (0: never), as the seed's `-s`.
        keep_best: at the end of `fit`, go back to the state of the step with the best test accuracy
            (ties: the earlier step; the last step is evaluated too), so the model saved after
            training is the best one measured, not the last. Callbacks are told by `on_restore`.
        mixup: train on mixes of two samples' features and labels with this strength (0: off;
            `edgetune.runtime.mixup`); default: the model's recipe (`session.mixup`).
        checkpoint_pattern: checkpoint path with a `{step}` field; default `<model>_trained_{step}.tod`
            next to the file the session was loaded from. The default is never built from
            `meta["name"]`: that is text from inside the model file (it could hold `../` or `/`),
            and saving there would put files where nobody asked for them.

    Raises:
        UserError: an empty train split, a negative interval, or checkpoints asked of a session
            not loaded from a file without a pattern.
    """

    def __init__(self, session: TrainSession, train: Split, test: Split | None = None, *,
                 callbacks: Sequence[Callback] = (), seed: int = 0, test_every: int = 20,
                 target_accuracy: float | None = 0.9, progress: Progress | None = None,
                 after_callback: AfterCallback | None = None, save_every: int = 0,
                 checkpoint_pattern: str | os.PathLike | None = None, keep_best: bool = False,
                 mixup: float | None = None) -> None:
        if len(train) == 0:
            raise UserError("the train split is empty: nothing to train on")
        if int(save_every) < 0 or int(test_every) < 0:
            raise UserError(f"save_every and test_every must be >= 0, got {save_every} and {test_every}")
        self.session, self.train, self.test = session, train, test
        self.callbacks = list(callbacks)
        self.test_every, self.target_accuracy, self.progress = int(test_every), target_accuracy, progress
        self.after_callback = after_callback
        self.save_every = int(save_every)
        self.checkpoint_pattern = _checkpoint_pattern(session, checkpoint_pattern) if self.save_every else None
        self.saved: list[str] = []
        self.stop = False
        self.keep_best = bool(keep_best)
        if self.keep_best and test is None:
            raise UserError("keep_best needs a test split to measure which step is best")
        self.best: tuple[int, float] | None = None  # (step, test accuracy) of the state kept by keep_best
        self.mixup = session.mixup if mixup is None else check_mixup(mixup)
        record = session.record
        if record.get("rng_state") is None:
            self._rng = np.random.Generator(np.random.PCG64(int(seed)))
            session.seed(int(seed))
            self._new_epoch()
            session.record_data_order(seed=int(seed))
        else:
            self._rng = np.random.Generator(np.random.PCG64())
            self._rng.bit_generator.state = record["rng_state"]
            self._epoch_state = record["rng_state"]
            self._order = self._rng.permutation(len(train))
            self._cursor = int(record.get("data_cursor") or 0)
        self._seed = int(session.record.get("seed") or 0)  # the run's data-order seed; mixup's draws use it

    @property
    def batch_size(self) -> int:
        """Samples per step: the model's batch size, or the whole split if it is smaller."""
        return min(self.session.batch_size, len(self.train))

    def _new_epoch(self) -> None:
        self._epoch_state = self._rng.bit_generator.state
        self._order = self._rng.permutation(len(self.train))
        self._cursor = 0

    def upcoming(self, steps: int) -> np.ndarray:
        """The train indices the next `steps` batches will draw (sorted, each once), without drawing them.

        The data order is seeded, so a run knows which images it will train on before its first
        step: net_runner extracts exactly those up front and then needs no backbone while training.
        """
        if steps * self.batch_size >= len(self.train):  # a pass or more: (nearly) every image
            return np.arange(len(self.train))
        rng = np.random.Generator(np.random.PCG64())
        rng.bit_generator.state = self._rng.bit_generator.state
        order, cursor, drawn = self._order, self._cursor, []
        for _ in range(steps):
            if cursor + self.batch_size > len(order):  # as `_next_batch`: the tail starts a new epoch
                order, cursor = rng.permutation(len(self.train)), 0
            drawn.append(order[cursor:cursor + self.batch_size])
            cursor += self.batch_size
        return np.unique(np.concatenate(drawn)) if drawn else np.arange(0)

    def _next_batch(self) -> np.ndarray:
        if self._cursor + self.batch_size > len(self._order):  # the partial tail starts a new epoch
            self._new_epoch()
        idx = self._order[self._cursor:self._cursor + self.batch_size]
        self._cursor += self.batch_size
        return idx

    def fit(self, cycles: int) -> Trainer:
        """Take up to `cycles` optimizer steps (fewer if the target accuracy is reached).

        Raises:
            TrainingDiverged: a non-finite loss, gradient or updated weight; the step was not applied
                and nothing was saved.
        """
        if cycles < 0:
            raise UserError(f"cycles must be >= 0, got {cycles}")
        self.stop = False
        session = self.session
        session.train()
        self._tell("on_train_begin", session)
        best = None  # (accuracy, step, state) of the best evaluation so far, with keep_best
        last = None  # (step, accuracy) of the last test evaluation
        for _ in range(cycles):
            idx = self._next_batch()
            features, labels = self._features(self.train, idx), self.train.labels[idx]
            if self.mixup:
                features, labels = mix(features, labels, session.num_classes, self.mixup, self._seed, session.step)
            session.run_head(features, labels, self.after_callback)
            step = session.step
            session.record_data_order(rng_state=self._epoch_state, data_cursor=self._cursor)
            self._tell("on_step", session, step, session.loss)
            if self.test is not None and self.test_every and step % self.test_every == 0:
                accuracy = self.evaluate("test")
                last = (step, accuracy)
                self.stop = self.target_accuracy is not None and accuracy > self.target_accuracy
                if self.keep_best and (best is None or accuracy > best[0]):
                    best = (accuracy, step, session.checkpoint_state())
            if self.save_every and step % self.save_every == 0:
                path = session.save(self.checkpoint_pattern.format(step=step))
                self.saved.append(path)
                self._tell("on_save", session, path)
            if self.stop:
                break
        if self.keep_best and cycles > 0:
            self._keep_best(best, last)
        self._flush_cache()
        self._tell("on_train_end", session)
        return self

    def _keep_best(self, best: tuple[float, int, Any] | None, last: tuple[int, float] | None) -> None:
        """Evaluate the last step if it was not, then go back to the best state (ties: the earlier)."""
        session = self.session
        final = last[1] if last is not None and last[0] == session.step else self.evaluate("test")
        if best is None or final > best[0]:
            self.best = (session.step, final)
            return
        accuracy, step, state = best
        self.best = (step, accuracy)
        if step != session.step:
            session.restore(state)
            self._tell("on_restore", session, step, accuracy)

    def evaluate(self, name: str = "test", split: Split | None = None) -> float:
        """Accuracy on a named split, kept in the session's record and told to every callback.

        Args:
            name: "test" (default split `self.test`; the best is kept as `best_test_accuracy`),
                "validation" (kept as `validation_accuracy`) or any other label.
            split: the split; required unless `name` is "test" or "train".
        """
        split = split if split is not None else {"test": self.test, "train": self.train}.get(name)
        if split is None:
            raise UserError(f"no {name} split to evaluate")
        accuracy = self.accuracy(split)
        self.session.record_accuracy(name, accuracy)
        self._tell("on_evaluate", self.session, name, accuracy)
        return accuracy

    def accuracy(self, split: Split) -> float:
        """Fraction of a split's samples whose argmax logit is their label (every sample counted)."""
        was_training = self.session.training
        self.session.eval()
        try:
            correct = 0
            for idx in self._chunks(split, "accuracy"):
                self.session.run_head(self._features(split, idx))
                correct += int((self.session.predictions == split.labels[idx]).sum())
        finally:
            if was_training:
                self.session.train()
        self._flush_cache()
        return correct / len(split)

    def features(self, split: Split) -> np.ndarray:
        """All frozen features of a split, (N, F), computed in streaming batches through the cache."""
        what = f"features {getattr(split, 'name', '')}".strip()
        out = self._features(split, np.arange(len(split)), what)
        self._flush_cache()
        return out

    def fill_cache(self, split: Split, indices: np.ndarray | None = None) -> None:
        """Run the frozen part over every sample of `split` (or those at `indices`) not cached yet,
        keeping nothing but the cache.

        `features` without its result: no (N, F) array is built (7000 Fashion-MNIST images per class
        = 56 MB per split for Lite0), so a cache that went to disk keeps the run's memory bounded.
        """
        if not self.session.ctx.cache:
            raise UserError("fill_cache needs the feature cache on (Context(cache=True))")
        idx = np.arange(len(split)) if indices is None else np.asarray(indices)
        self._features(split, idx, f"features {getattr(split, 'name', '')}".strip(), keep=False)
        self._flush_cache()

    def _flush_cache(self) -> None:
        """After a pass: persist the disk cache's buffered rows."""
        if self.session.ctx.cache:
            self.session.feature_cache.flush()

    def _chunks(self, split: Split, what: str, size: int = 64) -> Iterator[np.ndarray]:
        n = len(split)
        for start in range(0, n, size):
            yield np.arange(start, min(start + size, n))
            if self.progress is not None:
                self.progress(f"{what} {getattr(split, 'name', '')}".strip(), min(start + size, n), n)

    def _features(self, split: Split, idx: np.ndarray, what: str | None = None, keep: bool = True) -> np.ndarray | None:
        """Features of `split[idx]`; images are decoded `feature_batch` at a time, and with the cache
        on only those not cached yet (after the first epoch, none). Decoding runs `ctx.decode_ahead`
        batches ahead of the frozen graph in a producer thread (`pipeline.prefetch`); `what` names
        the progress reported after each batch (None: no progress), which counts the images to
        extract (the label says how many were cached; nothing is reported when all were).
        `keep=False` (cache on) only fills the cache and returns None."""
        sess = self.session
        cache = sess.feature_cache if sess.ctx.cache else None
        keys = [split.keys[i] for i in idx] if cache is not None else None
        rows = cache.get_many(keys) if cache is not None else [None] * len(idx)
        missing = [j for j, r in enumerate(rows) if r is None]
        step = sess.ctx.feature_batch
        parts = [missing[start:start + step] for start in range(0, len(missing), step)]
        cached = len(idx) - len(missing)
        label = f"{what} ({cached} cached)" if cached and what is not None else what
        done = 0  # the bar counts the images the backbone runs on: none when all are cached (no bar)
        for part, images in prefetch(parts, lambda part: split.images(idx[part]), sess.ctx.decode_ahead):
            fresh = sess.extract_features(images, keys=None if keys is None else [keys[j] for j in part])
            for k, j in enumerate(part):
                rows[j] = fresh[k] if keep else None
            done += len(part)
            if label is not None and self.progress is not None:
                self.progress(label, done, len(missing))
        return np.stack(rows).astype(np.float32, copy=False) if keep else None

    def _tell(self, hook: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(*args)


def _checkpoint_pattern(session: TrainSession, pattern: str | os.PathLike | None) -> str:
    """The checkpoint path pattern: the given one, or `<model>_trained_{step}.tod` next to the model file."""
    if pattern is not None:
        return os.fspath(pattern)
    if session.path is None:  # refused before any step, not at the first save
        raise UserError("checkpoints of a session not loaded from a file need a checkpoint_pattern")
    stem = os.path.splitext(session.path)[0]
    return stem.replace("{", "{{").replace("}", "}}") + "_trained_{step}.tod"
