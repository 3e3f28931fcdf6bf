"""Shared pytest fixtures for the runtime layer's tests: a tiny `.tod` so runtime tests need no Lite0.

`tiny_tod(...)` writes a model whose frozen part is a small ONNX graph built with onnx.helper
(Conv 3->8 3x3 + Relu + GlobalAveragePool + Flatten on (N, 3, 8, 8), dynamic N) and whose head and
meta follow docs/FORMAT.md, so it exercises exactly the path a converted Lite0 model takes.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest

from edgetune.runtime import format as tod_format
from edgetune.runtime.optim import OPTIMIZERS

TINY_FEATURES = 8
TINY_SHAPE = (3, 8, 8)

HEADS: dict[str, list[dict[str, Any]]] = {
    "dense": [{"op": "dense", "weight": "head.weight", "bias": "head.bias"}],
    "mlp": [{"op": "dense", "weight": "head.0.weight", "bias": "head.0.bias"}, {"op": "relu"},
            {"op": "dropout", "p": 0.25}, {"op": "flatten"},
            {"op": "dense", "weight": "head.4.weight", "bias": "head.4.bias"}],
    "nobias": [{"op": "identity"}, {"op": "dense", "weight": "head.weight", "bias": None}],
}


Mutation = Callable[[tod_format.TodFile], None]


def put(value: Any, *path: Any) -> Mutation:
    """A change to a model file's meta: `value` at `path` (keys and list indices), for tests that break files."""
    def go(tod: tod_format.TodFile) -> None:
        d = tod.meta
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value
    return go


def frozen_onnx(seed: int = 0) -> bytes:
    """The tiny frozen graph's bytes (opset 18, input `data`, output `features`)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.5, (TINY_FEATURES, 3, 3, 3)).astype(np.float32)
    b = rng.normal(0, 0.1, (TINY_FEATURES,)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["data", "conv.w", "conv.b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["features"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny_frozen",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", *TINY_SHAPE])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", TINY_FEATURES])],
        [numpy_helper.from_array(w, "conv.w"), numpy_helper.from_array(b, "conv.b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="edgetune-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def tiny_model(head: str | Sequence[dict[str, Any]] = "mlp", optimizer: dict[str, Any] | None = None,
               num_classes: int = 3, batch_size: int = 4, seed: int = 0) -> tod_format.TodFile:
    """A tiny model in memory: head weights ~ N(0, 0.3) from `seed`, zero optimizer slots."""
    # a copy: the model's meta must not alias HEADS (a test editing its model would edit every later one)
    spec = copy.deepcopy(HEADS[head] if isinstance(head, str) else list(head))
    optimizer = optimizer or {"name": "sgd", "lr": 0.05, "momentum": 0.9, "dampening": 0.01,
                              "weight_decay": 0.0, "nesterov": False}
    rng = np.random.default_rng(seed)
    dense = [op for op in spec if op["op"] == "dense"]
    widths = [TINY_FEATURES] + [6] * (len(dense) - 1) + [num_classes]
    tensors: dict[str, np.ndarray] = {}
    for op, (n_in, n_out) in zip(dense, itertools.pairwise(widths)):
        tensors[f"param/{op['weight']}"] = rng.normal(0, 0.3, (n_out, n_in)).astype(np.float32)
        if op.get("bias"):
            tensors[f"param/{op['bias']}"] = rng.normal(0, 0.1, (n_out,)).astype(np.float32)
    trainable = sorted(k[len("param/"):] for k in tensors)
    slots = OPTIMIZERS[optimizer["name"]].slots
    for name in trainable:
        for s in slots:
            tensors[f"optim/{name}/{s}"] = np.zeros_like(tensors[f"param/{name}"])
    meta = {
        "name": "tiny_tod", "created_by": "edgetune tests", "backbone": "tiny-conv",
        "num_classes": num_classes, "class_names": [str(i) for i in range(num_classes)],
        "batch_size": batch_size,
        "input": {"name": "data", "shape": [batch_size, *TINY_SHAPE], "dtype": "float32"},
        "label": {"name": "label", "shape": [batch_size, num_classes], "dtype": "float32", "encoding": "one-hot"},
        "preprocessing": {"resize_shorter": None, "crop": "center", "size": list(TINY_SHAPE[1:]), "layout": "NCHW",
                          "channels": "RGB", "scale": 1.0, "mean": [127.0] * 3, "std": [128.0] * 3},
        "frozen": {"blob": "frozen.onnx", "input": "data", "output": "features", "features": TINY_FEATURES},
        "head": spec, "trainable": trainable, "loss": "softmax_cross_entropy", "optimizer": optimizer,
        "optimizer_step": 0,
        "training": {"steps": 0, "best_test_accuracy": None, "validation_accuracy": None,
                     "seed": None, "rng_state": None, "data_cursor": None},
    }
    return tod_format.TodFile(meta=meta, tensors=tensors, blobs={"frozen.onnx": frozen_onnx(seed)})


class TinySplit:
    """A Split (as edgetune.runtime.dataset's contract) over random images: labels, keys, images()."""

    def __init__(self, n: int, num_classes: int = 3, seed: int = 0, name: str = "train") -> None:
        rng = np.random.default_rng(seed)
        self.name = name
        # class-dependent mean so the tiny model can actually learn something
        self.labels = rng.integers(0, num_classes, n).astype(np.int64)
        self._images = (rng.normal(0, 1, (n, *TINY_SHAPE)) + self.labels[:, None, None, None] * 0.7).astype(np.float32)
        self.paths = [f"{name}/{i}.bmp" for i in range(n)]
        self.keys = [f"{seed:04d}{name}{i:06d}" for i in range(n)]
        self.decoded = 0  # how many images were handed out (streaming checks)

    def __len__(self) -> int:
        return len(self.labels)

    def images(self, indices: Sequence[int]) -> np.ndarray:
        idx = list(indices)
        self.decoded += len(idx)
        return self._images[idx].copy()


class RecordingSplit:
    """Wraps a split and records the indices of every batch decoded (`calls`), in order."""

    def __init__(self, split: Any) -> None:
        self.split, self.name, self.labels, self.keys = split, split.name, split.labels, split.keys
        self.calls: list[list[int]] = []

    def __len__(self) -> int:
        return len(self.split)

    def images(self, indices: Sequence[int]) -> np.ndarray:
        self.calls.append([int(i) for i in indices])
        return self.split.images(indices)


@pytest.fixture
def tiny_tod(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., str]:
    """Factory: `tiny_tod(head="mlp", optimizer=None, num_classes=3, batch_size=4, seed=0) -> path`."""
    directory = tmp_path_factory.mktemp("tiny_tod")
    counter = itertools.count()

    def make(**kwargs: Any) -> str:
        path = directory / f"tiny_{next(counter)}.tod"
        return tod_format.save_file(tiny_model(**kwargs), path)

    return make


@pytest.fixture
def tiny_split() -> Callable[..., TinySplit]:
    """Factory for in-test Splits: `tiny_split(n, num_classes=3, seed=0, name="train")`."""
    return TinySplit
