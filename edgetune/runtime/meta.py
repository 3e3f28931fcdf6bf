"""Checks of a `.tod` model's meta that the file format cannot make (docs/FORMAT.md `meta`).

A file with valid checksums can still say things the runtime cannot honour: a missing key, a class
count that is a string, a head whose dense layers do not chain, a data-order state numpy refuses.
Checked once, when the session is created, each becomes one clear error there, instead of a
KeyError or a wrong-shape matmul an hour into training, or a checkpoint that cannot be resumed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from edgetune.errors import UserError
from edgetune.runtime.bounds import check_meta_sizes
from edgetune.runtime.dataset import check_preprocessing
from edgetune.runtime.layers import Dense, Layer

REQUIRED = ("frozen", "head", "trainable", "optimizer", "num_classes", "class_names", "batch_size",
            "input", "label", "preprocessing")
RNG_STATES = ("rng_state", "dropout_rng_state")


def check_meta(meta: dict[str, Any], tensors: Mapping[str, np.ndarray]) -> None:
    """Refuse a meta the session could only fail on later (types, counts, shapes, record state).

    Keys with a documented default (`loss`, `optimizer_step`, `training`) may be absent; a missing
    `training` record is added empty, so the session always has one to write into.

    Args:
        meta: the model's meta (the session's own copy).
        tensors: the model's tensors (`param/<name>` must be float32).

    Raises:
        ValueError: what is wrong, in words (the session adds the file name).
    """
    missing = [key for key in REQUIRED if key not in meta]
    if missing:
        raise ValueError(f"meta has no {', '.join(missing)}")
    check_meta_sizes(meta)
    n = _count(meta["num_classes"], "num_classes")
    batch = _count(meta["batch_size"], "batch_size")
    names = meta["class_names"]
    if not (isinstance(names, list) and all(isinstance(x, str) for x in names)):
        raise ValueError(f"class_names must be a list of strings, got {names!r:.80}")
    if len(names) != n:
        raise ValueError(f"class_names has {len(names)} names but num_classes={n}")
    _check_spec(meta["input"], "input", 4, batch)
    _check_spec(meta["label"], "label", 2, batch)
    if meta["label"]["shape"][1] != n:
        raise ValueError(f"label shape {meta['label']['shape']} is not [batch_size, num_classes={n}]")
    _check_preprocessing(meta["preprocessing"], meta["input"]["shape"])
    for key, kind in (("frozen", dict), ("optimizer", dict), ("head", list), ("trainable", list)):
        if not isinstance(meta[key], kind):
            raise ValueError(f"{key} must be a JSON {'object' if kind is dict else 'array'}, got {meta[key]!r:.80}")
    frozen = meta["frozen"]
    for key in ("blob", "input", "output"):
        if not isinstance(frozen.get(key), str):
            raise ValueError(f"frozen.{key} must be a string, got {frozen.get(key)!r}")
    if frozen.get("features") is not None:
        _count(frozen["features"], "frozen.features")
    for name in meta["trainable"]:
        t = tensors.get(f"param/{name}") if isinstance(name, str) else None
        if t is None:
            raise ValueError(f"trainable parameter {name!r} has no tensor param/{name}")
        if t.dtype != np.float32:
            raise ValueError(f"parameter {name} is {t.dtype}, not float32")
    step = meta.get("optimizer_step", 0)
    if type(step) is not int or step < 0:
        raise ValueError(f"optimizer_step must be an integer >= 0, got {step!r}")
    _check_record(meta.setdefault("training", {}))


def check_head(head: Sequence[Layer], features: int | None, num_classes: int) -> None:
    """The dense layers must chain: frozen features -> ... -> num_classes outputs.

    Only dense layers change the width (relu, dropout, flatten and identity keep it), so the
    widths are checked from the weight shapes alone, without running anything.

    Raises:
        ValueError: the first mismatch, naming the layer.
    """
    dense = [layer for layer in head if isinstance(layer, Dense)]
    if not dense:
        raise ValueError("the head has no dense layer")
    width = features if features is not None else dense[0].weight.data.shape[1]
    for i, layer in enumerate(dense):
        n_out, n_in = layer.weight.data.shape
        if n_in != width:
            if i == 0:
                raise ValueError(f"the head's first dense layer must take the {width} frozen features, "
                                 f"its weight {layer.weight.name} takes {n_in}")
            raise ValueError(f"dense layer {i} ({layer.weight.name}) takes {n_in} inputs, "
                             f"the layer before gives {width}")
        width = n_out
    if width != num_classes:
        raise ValueError(f"the head's last dense layer must have num_classes={num_classes} outputs, it has {width}")


def _count(value: Any, what: str) -> int:
    if type(value) is not int or value < 1:
        raise ValueError(f"{what} must be an integer >= 1, got {value!r}")
    return value


def _check_spec(spec: Any, what: str, rank: int, batch: int) -> None:
    """`input` / `label`: `{"name": str, "shape": [batch, ...positive ints], "dtype": "float32"}`."""
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ValueError(f"{what} must be an object with a name, got {spec!r:.80}")
    shape = spec.get("shape")
    if not (isinstance(shape, list) and len(shape) == rank and all(type(d) is int and d > 0 for d in shape)):
        raise ValueError(f"{what}.shape must be {rank} integers >= 1, got {shape!r:.80}")
    if shape[0] != batch:
        raise ValueError(f"{what}.shape {shape} does not start with batch_size={batch}")
    if spec.get("dtype") != "float32":
        raise ValueError(f"{what}.dtype must be float32, got {spec.get('dtype')!r}")


def _check_preprocessing(preprocessing: Any, input_shape: list[int]) -> None:
    """What the dataset loader checks, plus: its images must be the shape the model takes."""
    if not isinstance(preprocessing, dict):
        raise ValueError(f"preprocessing must be an object, got {preprocessing!r:.80}")
    try:
        check_preprocessing(preprocessing)
    except UserError as e:
        raise ValueError(str(e)) from None
    size = [int(v) for v in preprocessing["size"]]
    if [3, *size] != input_shape[1:]:
        raise ValueError(f"preprocessing makes 3x{size[0]}x{size[1]} RGB images, the model takes {input_shape[1:]}")


def _check_record(record: Any) -> None:
    """The training record: the data-order and dropout states must be ones numpy accepts."""
    if not isinstance(record, dict):
        raise ValueError(f"training must be an object, got {record!r:.80}")
    for key in RNG_STATES:
        if record.get(key) is not None:
            try:
                np.random.PCG64().state = record[key]
            except (TypeError, ValueError, KeyError, OverflowError) as e:
                raise ValueError(f"training.{key} is not a numpy PCG64 state ({e})") from None
    for key in ("data_cursor", "seed", "steps"):
        value = record.get(key)
        if value is not None and (type(value) is not int or value < 0):
            raise ValueError(f"training.{key} must be an integer >= 0 or null, got {value!r}")
    base_lr = record.get("base_lr")
    if base_lr is not None and not (type(base_lr) in (int, float) and math.isfinite(base_lr) and base_lr >= 0):
        raise ValueError(f"training.base_lr must be a number >= 0 or null, got {base_lr!r}")
