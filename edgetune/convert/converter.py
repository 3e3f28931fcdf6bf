"""`convert()` and `convert_backbone()`: an ONNX graph to a `.tod` device model (the seed's converter_lite step).

`convert` takes the training graph `edgetune export` wrote; `convert_backbone` takes any ONNX
backbone (from any framework), cuts it at a named tensor and adds the default head. Both end in
`build_tod`, which fills every `meta` key of docs/FORMAT.md. Nothing is written unless every check
passed, and the write itself is atomic (`format.save_file`).
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx

from edgetune import __version__
from edgetune.convert import frozen
from edgetune.convert.quantize import quantize_frozen
from edgetune.convert.spec import METADATA_KEY, SGD, Algorithm, Int8, check_loss, optimizer_slots
from edgetune.convert.spec import preprocessing as preset
from edgetune.convert.split import Head, split_head
from edgetune.errors import UserError
from edgetune.runtime.bounds import memory_limit
from edgetune.runtime.format import TodFile, load_file, save_file
from edgetune.runtime.meta import check_mixup, check_schedule
from edgetune.runtime.safe_read import read_file
from edgetune.runtime.head import OUTPUT, head_graph
from edgetune.runtime.module import Module
from edgetune.runtime.ops import Parameter

FROZEN_BLOB = "frozen.onnx"


def tod_path(output: str | os.PathLike) -> str:
    """`<output>.tod`, unless `output` already ends in `.tod`."""
    output = os.fspath(output)
    return output if output.endswith(".tod") else output + ".tod"


def convert(model_path: str | os.PathLike, output: str | os.PathLike, *, quantize: Int8 | None = None) -> str:
    """Convert an exported training graph (`edgetune export`) to a `.tod`.

    Args:
        model_path: the `.onnx` written by `edgetune.host.export`.
        output: the model path, `.tod` appended unless present.
        quantize: `Int8(calibration=DIR, ...)` to quantize the frozen part (edgetune.convert.quantize);
            None keeps it fp32.

    Returns:
        The `.tod` path written.

    Raises:
        UserError: not an edgetune training graph, no single boundary tensor, or an op in the head
            the device cannot train (no file is written then).
    """
    model = _load(model_path)
    entry = next((p.value for p in model.metadata_props if p.key == METADATA_KEY), None)
    if entry is None:
        raise UserError(f"{os.fspath(model_path)} has no edgetune training metadata; export it with "
                        f"`edgetune export`, or convert a plain backbone with --backbone-onnx and --cut")
    info = json.loads(entry)
    check_loss(info["loss"])
    check_schedule(info.get("schedule", "constant"))
    check_mixup(info.get("mixup", 0.0))
    head = split_head(model, info["trainable"], info["input"]["name"], info["output"], info.get("buffers", []),
                      cut_name=frozen.FEATURES, output_as=OUTPUT)
    blob, shape = _frozen(model, info["input"]["name"], head.boundary, tuple(info["input"]["shape"][1:]))
    blob, quantization = _quantized(blob, info, quantize)
    return _write(output, info, blob, shape, head, quantization)


def convert_backbone(onnx_path: str | os.PathLike, cut: str, num_classes: int, output: str | os.PathLike, *,
                     class_names: Sequence[str] | None = None, preprocessing: str | dict[str, Any] = "lite0",
                     optimizer: Algorithm = SGD(), batch_size: int = 32, seed: int = 0,
                     loss: str = "softmax_cross_entropy", backbone_name: str | None = None,
                     quantize: Int8 | None = None) -> str:
    """Make a `.tod` from any ONNX backbone: the graph up to tensor `cut` is frozen, a default head is added.

    Args:
        onnx_path: an ONNX model with one image input (N, C, H, W).
        cut: the tensor whose (N, F) values become the features.
        num_classes: outputs of the new head `Dense(F, num_classes)` (weights ~ N(0, 0.1), bias 0).
        output: the model path, `.tod` appended unless present.
        class_names: one per class; default `"0"`, `"1"`, ...
        preprocessing: a preset name (`lite0`, `imagenet`) or a full `meta.preprocessing` object.
        optimizer: an optimizer entry: `SGD(...)`, `Adam(...)`, ...
        batch_size: the training batch size.
        seed: seeds the head's initial weights (numpy PCG64).
        loss: the training loss.
        backbone_name: recorded in the model; default the file's base name.
        quantize: `Int8(calibration=DIR, ...)` to quantize the frozen part; None keeps it fp32.

    Returns:
        The `.tod` path written.

    Raises:
        UserError: `cut` is not a tensor of the graph (the message lists close names), the cut is not
            (N, F), or bad options.
    """
    model = _load(onnx_path)
    inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    if len(inputs) != 1:
        raise UserError(f"the backbone must have one image input, it has {[i.name for i in inputs]}")
    chw = _chw(inputs[0])
    names = [t for n in model.graph.node for t in n.output]
    if cut not in names:
        close = difflib.get_close_matches(cut, names, n=8, cutoff=0.4) or names[-8:]
        raise UserError(f"tensor {cut!r} is not in the graph; close names: {', '.join(close)}")
    class_names = [str(i) for i in range(num_classes)] if class_names is None else [str(c) for c in class_names]
    if num_classes < 1 or len(class_names) != num_classes:
        raise UserError(f"{len(class_names)} class names for {num_classes} classes")
    if isinstance(preprocessing, str):
        preprocessing = preset(preprocessing, chw[1:])
    check_loss(loss)
    blob, shape = _frozen(model, inputs[0].name, cut, chw)
    if len(shape) != 1:
        raise UserError(f"tensor {cut!r} is {list(shape)} per image; a backbone's cut must be (N, features)")
    features = shape[0]
    rng = np.random.default_rng(seed)
    params = {"head.weight": rng.normal(0.0, 0.1, (num_classes, features)).astype(np.float32),
              "head.bias": np.zeros(num_classes, np.float32)}
    info = {
        "backbone": backbone_name or os.path.splitext(os.path.basename(os.fspath(onnx_path)))[0],
        "trainable": sorted(params), "loss": loss, "optimizer": optimizer.to_meta(), "batch_size": int(batch_size),
        "num_classes": num_classes, "class_names": class_names,
        "input": {"name": inputs[0].name, "shape": [int(batch_size), *chw], "dtype": "float32"},
        "label": {"name": "label", "shape": [int(batch_size), num_classes], "dtype": "float32", "encoding": "one-hot"},
        "preprocessing": preprocessing,
    }
    layers = [{"op": "dense", "weight": "head.weight", "bias": "head.bias"}]
    blob, quantization = _quantized(blob, info, quantize)
    return _write(output, info, blob, shape, Head(cut, layers, params), quantization)


def _load(path: str | os.PathLike) -> onnx.ModelProto:
    """Parse an ONNX file without reading anything it points to: external data stays a reference
    (which `frozen.check_source` then refuses), where `onnx.load` would read the named files."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist")
    data = read_file(path, max_bytes=memory_limit(), why_cap=" (half the memory this process can get)")
    try:
        return onnx.load_model_from_string(data)
    except Exception as e:  # protobuf DecodeError and friends
        raise UserError(f"{path} is not an ONNX model: {e}") from None


def _chw(value: onnx.ValueInfoProto) -> tuple[int, int, int]:
    dims = value.type.tensor_type.shape.dim
    shape = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    if len(shape) != 4 or None in shape[1:]:
        raise UserError(f"input {value.name!r} must be (N, C, H, W) with fixed C, H, W; it is {shape}")
    return shape[1], shape[2], shape[3]


def _frozen(model: onnx.ModelProto, input_name: str, cut: str, chw: tuple[int, ...]) -> tuple[bytes, tuple[int, ...]]:
    frozen.check_source(model, chw)
    blob = frozen.optimize(frozen.extract(model, input_name, cut))
    frozen.check(blob, input_name, chw)
    return blob, frozen.probe(blob, input_name, chw)


def _quantized(blob: bytes, info: dict[str, Any], spec: Int8 | None) -> tuple[bytes, dict[str, Any] | None]:
    """The frozen part quantized as `spec` says, with its `meta.frozen.quantization` record (unchanged for None)."""
    if spec is None:
        return blob, None
    return quantize_frozen(blob, info["input"]["name"], info["preprocessing"], spec, info["num_classes"])


def _write(output: str | os.PathLike, info: dict[str, Any], blob: bytes, shape: tuple[int, ...], head: Head,
           quantization: dict[str, Any] | None = None) -> str:
    """Check the head's shapes against the cut and classes, build the `.tod`, save it atomically.

    A layer-list head makes a version-1.0 file, as before; a node-list head (a trainable sub-graph)
    a version-2.0 file with the cut's shape, its buffers and constants (docs/FORMAT.md).
    """
    features = math.prod(shape)
    params = head.params
    try:  # the runtime's own check: one sample through the head as the device will build it
        nodes, constants = head_graph(head.layers, frozen.FEATURES, params)
        module = Module(nodes, {n: Parameter(n, v) for n, v in params.items()}, frozen.FEATURES, OUTPUT,
                        {**constants, **head.constants, **head.buffers}, info["loss"],
                        input_shape=shape if head.graph else None)
        module.check(features, info["num_classes"])
    except ValueError as e:
        raise UserError(f"the head does not fit the {features} frozen features and {info['num_classes']} classes: "
                        f"{e}") from None
    path = tod_path(output)
    meta = {
        "name": os.path.basename(path)[: -len(".tod")],
        "created_by": f"edgetune {__version__}",
        **{k: info[k] for k in ("backbone", "num_classes", "class_names", "batch_size", "input", "label",
                                "preprocessing", "trainable", "loss", "optimizer")},
        "frozen": {"blob": FROZEN_BLOB, "input": info["input"]["name"], "output": frozen.FEATURES,
                   "features": features, **({"shape": list(shape)} if head.graph else {})},
        "head": head.layers,
        **({"buffers": sorted(head.buffers)} if head.buffers else {}),
        **({"param_groups": info["param_groups"]} if info.get("param_groups") else {}),
        **({"schedule": info["schedule"]} if info.get("schedule", "constant") != "constant" else {}),
        **({"mixup": info["mixup"]} if info.get("mixup") else {}),
        "optimizer_step": 0,
        "training": {"steps": 0, "best_test_accuracy": None, "validation_accuracy": None,
                     "seed": None, "rng_state": None, "data_cursor": None},
    }
    if quantization is not None:
        meta["frozen"]["quantization"] = quantization
    tensors = {f"param/{name}": np.ascontiguousarray(v, np.float32) for name, v in params.items()}
    tensors.update((f"buffer/{name}", np.ascontiguousarray(v, np.float32)) for name, v in head.buffers.items())
    tensors.update((f"const/{name}", np.ascontiguousarray(v)) for name, v in head.constants.items())
    for name, value in params.items():
        for slot in optimizer_slots(meta["optimizer"]):
            tensors[f"optim/{name}/{slot}"] = np.zeros_like(value, np.float32)
    version = (2, 0) if head.graph else (1, 0)
    return save_file(TodFile(meta=meta, tensors=tensors, blobs={FROZEN_BLOB: blob}, version=version), path)


def quantize_tod(model: str | os.PathLike, output: str | os.PathLike, spec: Int8) -> str:
    """Write a `.tod` like `model` whose frozen part is quantized; head, optimizer state and record are kept.

    Args:
        model: a `.tod` with an fp32 frozen part (from `edgetune convert`, or a checkpoint).
        output: the new model's path, `.tod` appended unless present.
        spec: the options.

    Returns:
        The path written.

    Raises:
        UserError: the frozen part is already quantized, or anything `quantize_frozen` refuses.
        TodError: `model` is not a readable `.tod`.
    """
    tod = load_file(os.fspath(model))
    meta = copy.deepcopy(tod.meta)
    if meta["frozen"].get("quantization"):
        raise UserError(f"{os.fspath(model)}: its frozen part is already quantized "
                        f"({meta['frozen']['quantization'].get('scheme')})")
    name = meta["frozen"]["blob"]
    blob, meta["frozen"]["quantization"] = quantize_frozen(bytes(tod.blobs[name]), meta["frozen"]["input"],
                                                           meta["preprocessing"], spec, meta["num_classes"])
    path = tod_path(output)
    meta["name"] = os.path.basename(path)[: -len(".tod")]
    return save_file(TodFile(meta=meta, tensors=dict(tod.tensors), blobs={**tod.blobs, name: blob}, version=tod.version),
                     path)
