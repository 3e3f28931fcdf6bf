"""Structurally valid `.tod` files with semantically wrong meta: refused at `TrainSession.create`.

Each case takes the tiny model (tests/fixtures_runtime.py), breaks one thing the format cannot see
(a missing key, a head naming an absent parameter, shapes that do not chain, wrong types, a frozen
graph that is not ONNX or has other tensor names, a garbled data-order state) and saves it with
valid checksums. `create` must raise TodError or UserError, never KeyError/ValueError/an
onnxruntime error, and never load a model that fails later, mid-training. A few keys have
documented defaults: without them the model must load and train, save and load again.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgetune.errors import UserError
from edgetune.runtime import format as tod_format
from tests.fixtures_runtime import Mutation, TinySplit, put, tiny_model


def drop(*path: Any) -> Mutation:
    def go(tod: tod_format.TodFile) -> None:
        d = tod.meta
        for k in path[:-1]:
            d = d[k]
        del d[path[-1]]
    return go


def tensor(name: str, value: np.ndarray | None, *, with_slot: bool = False) -> Mutation:
    """Replace (None: remove) a tensor; `with_slot` reshapes its momentum slot to match."""
    def go(tod: tod_format.TodFile) -> None:
        if value is None:
            del tod.tensors[name]
            return
        tod.tensors[name] = value
        if with_slot:
            tod.tensors[f"optim/{name[len('param/'):]}/momentum_buffer"] = np.zeros_like(value, np.float32)
    return go


def blob(value: bytes) -> Mutation:
    def go(tod: tod_format.TodFile) -> None:
        tod.blobs["frozen.onnx"] = value
    return go


REQUIRED = ("frozen", "head", "trainable", "optimizer", "num_classes", "input", "label", "preprocessing",
            "batch_size", "class_names")
INVALID: dict[str, Mutation] = {
    **{f"no {key}": drop(key) for key in REQUIRED},
    "no frozen.output": drop("frozen", "output"),
    "no optimizer.lr": drop("optimizer", "lr"),
    "head names an absent param": put("nope", "head", 0, "weight"),
    "trainable lists an absent param": put(["ghost", "head.0.bias", "head.0.weight", "head.4.bias", "head.4.weight"],
                                           "trainable"),
    "param tensor missing": tensor("param/head.0.bias", None),
    "first dense does not take the features": tensor("param/head.0.weight", np.zeros((6, 7), np.float32),
                                                     with_slot=True),
    "dense layers do not chain": tensor("param/head.4.weight", np.zeros((3, 5), np.float32), with_slot=True),
    "bias of the wrong length": tensor("param/head.4.bias", np.zeros((4,), np.float32), with_slot=True),
    "3-d dense weight": tensor("param/head.4.weight", np.zeros((3, 6, 1), np.float32), with_slot=True),
    "int64 parameter": tensor("param/head.4.bias", np.zeros((3,), np.int64), with_slot=True),
    "num_classes is not the head's output": put(4, "num_classes"),
    "num_classes a string": put("3", "num_classes"),
    "num_classes 0": put(0, "num_classes"),
    "batch_size -1": put(-1, "batch_size"),
    "batch_size a string": put("x", "batch_size"),
    "class_names shorter than num_classes": put(["a", "b"], "class_names"),
    "head not a list": put({"op": "dense"}, "head"),
    "unknown head op": put({"op": "conv"}, "head", 1),
    "dropout p 1.5": put({"op": "dropout", "p": 1.5}, "head", 2),
    "unknown optimizer": put("rmsprop", "optimizer", "name"),
    "lr a string": put("fast", "optimizer", "lr"),
    "lr negative": put(-1.0, "optimizer", "lr"),
    "slot of the wrong shape": tensor("optim/head.0.bias/momentum_buffer", np.zeros((2,), np.float32)),
    "optimizer_step a string": put("x", "optimizer_step"),
    "optimizer_step negative": put(-5, "optimizer_step"),
    "input shape a string": put("big", "input", "shape"),
    "frozen blob absent": put("nope.onnx", "frozen", "blob"),
    "rng_state garbled": put({"bit_generator": "PCG64", "state": "x"}, "training", "rng_state"),
    "rng_state a string": put("x", "training", "rng_state"),
    "dropout_rng_state garbled": put([1, 2], "training", "dropout_rng_state"),
    "training record a list": put([], "training"),
}
# Checking these needs the frozen graph loaded in onnxruntime, which the session does when it is
# created: refused at create (the test also allows the first feature extraction, which is later still
# before any step), with the same error types.
FROZEN: dict[str, Mutation] = {
    "input shape not the graph's": put([4, 3, 9, 9], "input", "shape"),
    "frozen blob not ONNX": blob(b"\x08\x07garbage" * 10),
    "frozen.features not the graph's": put(9, "frozen", "features"),
    "frozen.output not in the graph": put("nope", "frozen", "output"),
    "frozen.input not in the graph": put("nope", "frozen", "input"),
}
DEFAULTED: dict[str, Mutation] = {
    "no training record": drop("training"),
    "no optimizer_step": drop("optimizer_step"),
    "no loss": drop("loss"),
}


def _write(mutation: Mutation, tmp_path: Path) -> str:
    tod = copy.deepcopy(tiny_model())  # deep: the fixture's head spec is shared module state
    mutation(tod)
    return tod_format.save_file(tod, tmp_path / "model.tod")


@pytest.mark.parametrize("case", sorted(INVALID))
def test_semantically_wrong_model_is_refused_at_create(case: str, tmp_path: Path) -> None:
    from edgetune.runtime import TrainSession

    path = _write(INVALID[case], tmp_path)
    with pytest.raises((tod_format.TodError, UserError)):
        TrainSession.create(path)


@pytest.mark.parametrize("case", sorted(FROZEN))
def test_wrong_frozen_graph_is_refused_before_training(case: str, tmp_path: Path) -> None:
    from edgetune.runtime import TrainSession

    path = _write(FROZEN[case], tmp_path)
    with pytest.raises((tod_format.TodError, UserError)):
        TrainSession.create(path).extract_features(np.zeros((2, 3, 8, 8), np.float32))


@pytest.mark.parametrize("case", sorted(DEFAULTED))
def test_key_with_a_default_may_be_missing(case: str, tmp_path: Path) -> None:
    """Train a few steps with evaluations, save, load the checkpoint: all must work."""
    from edgetune.runtime import TrainSession
    from edgetune.runtime.trainer import Trainer

    sess = TrainSession.create(_write(DEFAULTED[case], tmp_path))
    trainer = Trainer(sess, TinySplit(12), TinySplit(6, seed=1, name="test"), test_every=2, target_accuracy=None)
    trainer.fit(3)
    assert sess.step == 3 and 0 <= trainer.accuracy(trainer.train) <= 1
    again = TrainSession.create(sess.save(tmp_path / "ckpt.tod"))
    assert again.step == 3
    for name, param in sess.params.items():
        assert np.array_equal(again.params[name].data, param.data)
