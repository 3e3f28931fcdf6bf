"""What one device does in a round: train the global model's trainable part on its own data.

Framework-free on purpose: both Flower paths (the Message API ClientApp and the legacy NumPyClient
that SecAgg+ needs) call `train_locally`, so the two paths train identically and the secure
aggregate can be checked against the plain one.

Each round starts from the device's own `.tod` (frozen part, head layout, optimizer and its state;
its own checkpoint of the last round when it keeps one) with the global trainable tensors loaded
into it, takes `local_steps` optimizer steps on the device's train split with the model's
optimizer (BatchNorm normalising with the global model's running statistics, which devices do not
send), and measures accuracy on the device's test split. Every round's data order is seeded by
(seed, round, partition), so the same inputs give the same round; the frozen features are cached
on disk (`cache_dir`), so only the first round runs the backbone (Flower starts a new ClientApp
process for every message).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from edgetune.errors import UserError
from edgetune.runtime import Context, TrainSession
from edgetune.runtime.callbacks import Callback
from edgetune.runtime.dataset import load_dataset
from edgetune.runtime.trainer import Trainer


@dataclass(frozen=True)
class LocalResult:
    """A device's reply: its trained tensors, how many examples it trained on, and two metrics.

    Attributes:
        parameters: trainable tensors by name, after local training.
        num_examples: size of the device's train split (FedAvg's weight).
        train_loss: mean loss over the local steps.
        test_accuracy: accuracy on the device's test split after local training.
    """

    parameters: dict[str, np.ndarray]
    num_examples: int
    train_loss: float
    test_accuracy: float


class _MeanLoss(Callback):
    """Collects the loss of every local step (the reply reports their mean)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_step(self, session: TrainSession, step: int, loss: float) -> None:
        self.losses.append(loss)


def round_seed(seed: int, server_round: int, partition: int) -> int:
    """The data-order seed of one device in one round: a fresh order every round, the same on a replay."""
    return int(np.random.SeedSequence([int(seed), int(server_round), int(partition)]).generate_state(1)[0])


def train_locally(model: str | os.PathLike, data: str | os.PathLike, parameters: Mapping[str, np.ndarray], *,
                  server_round: int, partition: int, local_steps: int, lr: float | None = None, seed: int = 0,
                  cache_dir: str | os.PathLike | None = None, state: str | os.PathLike | None = None,
                  model_sha256: str | None = None) -> LocalResult:
    """Train the global tensors for `local_steps` steps on this device's data.

    Args:
        model: this device's `.tod` (it must be the server's model: same frozen part and head).
        data: this device's prepared dataset (its shard); train and test splits are used.
        parameters: the global trainable tensors by name.
        server_round: the round number (seeds the data order).
        partition: this device's partition id (seeds the data order).
        local_steps: optimizer steps to take.
        lr: learning rate; None keeps the model's (its schedule's base rate if one left it).
        seed: the run's seed.
        cache_dir: where this device keeps its frozen features across rounds.
        state: this device's own checkpoint across rounds: when it exists, training starts from it
            instead of from `model` (its optimizer state and step carry over, only the trainable
            tensors are replaced by the global ones); it is rewritten atomically after training.
        model_sha256: the server's frozen-part hash; a device whose model differs refuses to train.

    Returns:
        The trained tensors, the train split's size and the two metrics.

    Raises:
        UserError: another model than the server's, tensors that do not fit it, a bad dataset.
        TrainingDiverged: a step made the loss or a weight non-finite (nothing is returned then).
    """
    if local_steps < 1:
        raise UserError(f"local steps must be >= 1, got {local_steps}")
    start = state if state is not None and os.path.isfile(state) else model
    session = TrainSession.create(start, Context(threads=1, cache_dir=cache_dir))
    if model_sha256 is not None and session.model_sha256 != model_sha256:
        raise UserError(f"{start}: this device's model is not the server's (frozen part "
                        f"{session.model_sha256[:12]}, the server's {model_sha256[:12]})")
    session.load_parameters(parameters)
    session.freeze_batch_statistics()  # the global model's running statistics are not averaged: train with them
    # `lr`, or the model's base rate: a model trained with a schedule saved the rate it ended on
    # (a cosine's is ~0), and every round trains at a constant rate
    session.restart_learning_rate(lr)
    # this round's own data order, whatever order a checkpoint (the device's, or a model that is
    # one) stood at: the Trainer goes on from the order the record holds
    order = np.random.PCG64(round_seed(seed, server_round, partition))
    session.record_data_order(rng_state=order.state, data_cursor=0)
    dataset = load_dataset(data, session.preprocessing, num_classes=session.num_classes)
    losses = _MeanLoss()
    trainer = Trainer(session, dataset.train, dataset.test, callbacks=[losses], test_every=0, target_accuracy=None)
    trainer.fit(local_steps)
    accuracy = trainer.evaluate("test")
    if state is not None:
        session.save(state)
    return LocalResult(session.parameters(), len(dataset.train), float(np.mean(losses.losses)), accuracy)


def check_update(parameters: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]],
                 num_examples: float) -> str | None:
    """Why a device's update cannot be averaged, or None if it can.

    The server checks every plain reply with this before FedAvg sees it: one bad device must
    not poison the global model (a NaN spreads to every weight) or stop the round (arrays of
    other shapes cannot be averaged).

    Args:
        parameters: the update's tensors by name.
        expected: every trainable tensor's name and shape.
        num_examples: the weight the device claims.
    """
    names, given = set(expected), set(parameters)
    if names != given:
        return f"tensors {sorted(given)} instead of {sorted(names)}"
    for name, shape in expected.items():
        a = np.asarray(parameters[name])
        if a.shape != tuple(shape):
            return f"{name} has shape {a.shape}, the model's is {tuple(shape)}"
        if not np.issubdtype(a.dtype, np.floating):
            return f"{name} is {a.dtype}, not floating point"
        if not np.isfinite(a).all():
            return f"{name} has {int(np.size(a) - np.isfinite(a).sum())} non-finite values"
    if not (isinstance(num_examples, (int, float)) and math.isfinite(num_examples) and num_examples > 0):
        return f"num-examples is {num_examples!r}, not a positive number"
    return None
