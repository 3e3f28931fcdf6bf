"""What every benchmarked system shares: arguments, data, batch order and the seed-style log.

Each system is a separate script run in its own process by ``bench/run.py``. They all read the
same prepared image folder through edgetune's loader (its numpy BMP reader, the preprocessing stored
in the ``.tod``), so decoding costs the same everywhere (the true floor decodes everything before it
starts its clock), draw their training batches in the Trainer's order (``batch_order``), and print
the lines ``net_runner``
prints (``i: Loss is X [min=Y]``, ``accuracy on test data = ...``, ``accuracy on validation
data = ...``) so that one parser times every system the same way.

This module only needs numpy, Pillow and ``edgetune.runtime``: it also runs in the ONNX Runtime
training venv, where ``bench/run.py`` puts the repository on ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterator

import numpy as np

from edgetune.runtime.dataset import Split, load_dataset
from edgetune.runtime.format import load_file


def parser(description: str) -> argparse.ArgumentParser:
    """Return the argument parser all system scripts share.

    Args:
        description: One line saying which system the script is.

    Returns:
        A parser with the work unit (steps, evaluation and checkpoint cadence) and the
        resources (threads, output directory).
    """
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", required=True, help="the .tod model (head weights, preprocessing)")
    p.add_argument("--data", required=True, help="prepared dataset folder (classes.txt + 0..9/)")
    p.add_argument("--steps", type=int, default=60, help="training steps")
    p.add_argument("--test-every", type=int, default=20, help="test accuracy every N steps")
    p.add_argument("--save-every", type=int, default=20, help="checkpoint every N steps")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads")
    p.add_argument("--out", required=True, help="directory for checkpoints")
    p.add_argument("--seed", type=int, default=0, help="data order seed")
    p.add_argument("--extra", default="", help="system-specific input (e.g. an ONNX file)")
    return p


def load_model_meta(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray], bytes]:
    """Read the ``.tod`` every system starts from.

    Returns:
        ``(meta, params, frozen_onnx)``: the meta dict, the trainable tensors by their torch name
        (``head.weight`` ...), and the frozen graph's ONNX bytes, so that every system starts
        from the same head weights and the floor runs the very graph edgetune runs.
    """
    tod = load_file(os.fspath(path))
    meta = tod.meta
    params = {name: np.asarray(tod.tensors[f"param/{name}"]) for name in meta["trainable"]}
    frozen = bytes(tod.blobs[meta["frozen"]["blob"]])
    return meta, params, frozen


def load_splits(data: str | os.PathLike, meta: dict) -> tuple[Split, Split, Split]:
    """Load the train, test and validation splits with the model's preprocessing."""
    ds = load_dataset(data, meta["preprocessing"], num_classes=meta["num_classes"])
    return ds.train, ds.test, ds.validation


def batch_order(n: int, batch: int, steps: int, seed: int) -> Iterator[np.ndarray]:
    """Yield ``steps`` index batches in exactly the order edgetune's Trainer draws them.

    The Trainer's rule (``edgetune.runtime.trainer.Trainer._next_batch``): a PCG64 generator seeded
    with ``seed`` gives one permutation of the ``n`` train samples per epoch; batches are
    consecutive slices of it; a batch that would run past the end starts a new epoch with a fresh
    permutation instead (the partial tail of the old one is dropped); the batch size is at most
    ``n``. tests/test_bench_common.py checks this against the Trainer itself.
    """
    rng = np.random.Generator(np.random.PCG64(seed))
    batch = min(batch, n)
    order, cursor = rng.permutation(n), 0
    for _ in range(steps):
        if cursor + batch > n:
            order, cursor = rng.permutation(n), 0
        yield order[cursor:cursor + batch]
        cursor += batch


def accuracy(split: Split, predict: Callable[[np.ndarray], np.ndarray], batch: int) -> float:
    """Accuracy over every sample of a split (no dropped partial batch).

    Args:
        split: The split to score.
        predict: Maps a list of sample indices to predicted class ids.
        batch: How many samples to predict at once.
    """
    correct = 0
    for start in range(0, len(split), batch):
        idx = np.arange(start, min(start + batch, len(split)))
        correct += int(np.sum(predict(idx) == split.labels[idx]))
    return correct / len(split)


class SeedLog:
    """Prints the seed's training log, flushed, so the runner can time every line."""

    def __init__(self) -> None:
        self.min_loss = float("inf")
        self.max_acc = 0.0

    def step(self, i: int, loss: float) -> None:
        """Print ``i: Loss is X [min=Y]`` for step ``i`` (1-based)."""
        self.min_loss = min(self.min_loss, loss)
        print(f"{i}: Loss is {loss:g} [min={self.min_loss:g}]", flush=True)

    def test(self, acc: float) -> None:
        """Print the test accuracy line."""
        self.max_acc = max(self.max_acc, acc)
        print(f"accuracy on test data = {acc:g} max accuracy = {self.max_acc:g}", flush=True)

    @staticmethod
    def validation(acc: float) -> None:
        """Print the final validation accuracy line."""
        print(f"accuracy on validation data = {acc:g}", flush=True)
