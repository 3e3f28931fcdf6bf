"""Checks of a `.tod` model's meta that the file format cannot make (docs/FORMAT.md `meta`).

A file with valid checksums can still say things the runtime cannot honour: a missing key, a class
count that is a string, a data-order state numpy refuses. Checked once, when the session is
created, each becomes one clear `ModelError` there, instead of a KeyError an hour into training or
a checkpoint that cannot be resumed. (Whether the head's layers fit together is checked by running
one sample through them: `Module.check`.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from edgetune.errors import UserError
from edgetune.runtime.bounds import check_meta_sizes
from edgetune.runtime.format import HeaderError
from edgetune.runtime.normalize import check_preprocessing

REQUIRED = ("frozen", "head", "trainable", "optimizer", "num_classes", "class_names", "batch_size",
            "input", "label", "preprocessing")
RNG_STATES = ("rng_state", "dropout_rng_state")
SCHEDULES = ("constant", "cosine", "step")  # `meta.schedule`: what a recipe may ask of a run (callbacks.py)
MAX_MIXUP = 10.0  # `meta.mixup`: Beta(alpha, alpha) beyond this is all but a constant 0.5 mix; a larger alpha is a typo


class ModelError(HeaderError):
    """A well-formed `.tod` whose content cannot be used; the message says what is wrong."""


def check_meta(meta: dict[str, Any], tensors: Mapping[str, np.ndarray]) -> None:
    """Refuse a meta the session could only fail on later (types, counts, shapes, record state).

    Keys with a documented default (`loss`, `optimizer_step`, `training`) may be absent; a missing
    `training` record is added empty, so the session always has one to write into.

    Args:
        meta: the model's meta (the session's own copy).
        tensors: the model's tensors (`param/<name>` must be float32).

    Raises:
        ModelError: what is wrong, in words (the session adds the file name).
    """
    missing = [key for key in REQUIRED if key not in meta]
    if missing:
        raise ModelError(f"meta has no {', '.join(missing)}")
    try:
        check_meta_sizes(meta)
    except ValueError as e:  # bounds.py speaks ValueError (it sits below the format); here it is a bad model
        raise ModelError(str(e)) from None
    n = _count(meta["num_classes"], "num_classes")
    batch = _count(meta["batch_size"], "batch_size")
    names = meta["class_names"]
    if not (isinstance(names, list) and all(isinstance(x, str) for x in names)):
        raise ModelError(f"class_names must be a list of strings, got {names!r:.80}")
    if len(names) != n:
        raise ModelError(f"class_names has {len(names)} names but num_classes={n}")
    _check_spec(meta["input"], "input", 4, batch)
    _check_spec(meta["label"], "label", 2, batch)
    if meta["label"]["shape"][1] != n:
        raise ModelError(f"label shape {meta['label']['shape']} is not [batch_size, num_classes={n}]")
    _check_preprocessing(meta["preprocessing"], meta["input"]["shape"])
    for key, kind in (("frozen", dict), ("optimizer", dict), ("head", list), ("trainable", list)):
        if not isinstance(meta[key], kind):
            raise ModelError(f"{key} must be a JSON {'object' if kind is dict else 'array'}, got {meta[key]!r:.80}")
    frozen = meta["frozen"]
    for key in ("blob", "input", "output"):
        if not isinstance(frozen.get(key), str):
            raise ModelError(f"frozen.{key} must be a string, got {frozen.get(key)!r}")
    if frozen.get("features") is not None:
        _count(frozen["features"], "frozen.features")
    shape = frozen.get("shape")
    if shape is not None:  # the cut's per-image shape, e.g. [192, 7, 7]; the cache keeps it flat
        if not (isinstance(shape, list) and 1 <= len(shape) <= 3 and all(type(d) is int and d > 0 for d in shape)):
            raise ModelError(f"frozen.shape must be 1 to 3 integers >= 1, got {shape!r:.80}")
        if frozen.get("features") != math.prod(shape):
            raise ModelError(f"frozen.shape {shape} does not hold frozen.features={frozen.get('features')} values")
    buffers = meta.get("buffers", [])
    if not (isinstance(buffers, list) and all(isinstance(b, str) for b in buffers)):
        raise ModelError(f"buffers must be a list of names, got {buffers!r:.80}")
    for name in buffers:
        t = tensors.get(f"buffer/{name}")
        if t is None or t.dtype != np.float32:
            raise ModelError(f"buffer {name!r} has no float32 tensor buffer/{name}")
    for name in meta["trainable"]:
        t = tensors.get(f"param/{name}") if isinstance(name, str) else None
        if t is None:
            raise ModelError(f"trainable parameter {name!r} has no tensor param/{name}")
        if t.dtype != np.float32:
            raise ModelError(f"parameter {name} is {t.dtype}, not float32")
    if meta.get("schedule", "constant") not in SCHEDULES:
        raise ModelError(f"schedule must be one of {', '.join(SCHEDULES)}, got {meta['schedule']!r:.80}")
    if not _mixup_ok(meta.get("mixup", 0.0)):
        raise ModelError(f"mixup must be a number in [0, {MAX_MIXUP:g}], got {meta['mixup']!r:.80}")
    step = meta.get("optimizer_step", 0)
    if type(step) is not int or step < 0:
        raise ModelError(f"optimizer_step must be an integer >= 0, got {step!r}")
    _check_record(meta.setdefault("training", {}))


def check_schedule(name: object) -> str:
    """`name` if it is one of `SCHEDULES`; else a UserError listing them."""
    if name not in SCHEDULES:
        raise UserError(f"unknown schedule {name!r}; known: {', '.join(SCHEDULES)}")
    return name


def check_mixup(alpha: object, what: str = "mixup") -> float:
    """`alpha` as a float if it is a mixup strength in [0, MAX_MIXUP] (0: off); else a UserError naming `what`."""
    if not _mixup_ok(alpha):
        raise UserError(f"{what} must be a number in [0, {MAX_MIXUP:g}] (0: off), got {alpha!r:.80}")
    return float(alpha)


def _mixup_ok(alpha: object) -> bool:
    return type(alpha) in (int, float) and math.isfinite(alpha) and 0 <= alpha <= MAX_MIXUP


def _count(value: Any, what: str) -> int:
    if type(value) is not int or value < 1:
        raise ModelError(f"{what} must be an integer >= 1, got {value!r}")
    return value


def _check_spec(spec: Any, what: str, rank: int, batch: int) -> None:
    """`input` / `label`: `{"name": str, "shape": [batch, ...positive ints], "dtype": "float32"}`."""
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ModelError(f"{what} must be an object with a name, got {spec!r:.80}")
    shape = spec.get("shape")
    if not (isinstance(shape, list) and len(shape) == rank and all(type(d) is int and d > 0 for d in shape)):
        raise ModelError(f"{what}.shape must be {rank} integers >= 1, got {shape!r:.80}")
    if shape[0] != batch:
        raise ModelError(f"{what}.shape {shape} does not start with batch_size={batch}")
    if spec.get("dtype") != "float32":
        raise ModelError(f"{what}.dtype must be float32, got {spec.get('dtype')!r}")


def _check_preprocessing(preprocessing: Any, input_shape: list[int]) -> None:
    """What the dataset loader checks, plus: its images must be the shape the model takes."""
    if not isinstance(preprocessing, dict):
        raise ModelError(f"preprocessing must be an object, got {preprocessing!r:.80}")
    try:
        check_preprocessing(preprocessing)
    except UserError as e:
        raise ModelError(str(e)) from None
    size = [int(v) for v in preprocessing["size"]]
    if [3, *size] != input_shape[1:]:
        raise ModelError(f"preprocessing makes 3x{size[0]}x{size[1]} RGB images, the model takes {input_shape[1:]}")


def _check_record(record: Any) -> None:
    """The training record: the data-order and dropout states must be ones numpy accepts."""
    if not isinstance(record, dict):
        raise ModelError(f"training must be an object, got {record!r:.80}")
    for key in RNG_STATES:
        if record.get(key) is not None:
            try:
                np.random.PCG64().state = record[key]
            except (TypeError, ValueError, KeyError, OverflowError) as e:
                raise ModelError(f"training.{key} is not a numpy PCG64 state ({e})") from None
    for key in ("data_cursor", "seed", "steps"):
        value = record.get(key)
        if value is not None and (type(value) is not int or value < 0):
            raise ModelError(f"training.{key} must be an integer >= 0 or null, got {value!r}")
    base_lr = record.get("base_lr")
    if base_lr is not None and not (type(base_lr) in (int, float) and math.isfinite(base_lr) and base_lr >= 0):
        raise ModelError(f"training.base_lr must be a number >= 0 or null, got {base_lr!r}")
