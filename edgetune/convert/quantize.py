"""Static int8 quantization of the frozen part with onnxruntime's own tools; the head stays fp32.

The steps are onnxruntime's documented recipe (`onnxruntime.quantization`): `quant_pre_process`
(symbolic shape inference + the basic optimizer), then `quantize_static` in QDQ format with
per-channel int8 weights and uint8 activations, whose ranges come from calibration images run
through the model's own preprocessing (`meta.preprocessing`, read from the model, never re-typed).
The calibration images are drawn from the *train* split of the user's prepared dataset (the
loader's 60/20/20 rule), the same number from every class, spread evenly over each class, so test
and validation images never shape the quantized model.

`reduce_range` (7-bit weights) follows onnxruntime's guidance: on x86 CPUs without VNNI the u8s8
kernels (`vpmaddubsw`) can saturate their 16-bit sums, and 7-bit weights cannot; with VNNI
(`avx512_vnni`, `avx_vnni`) and on ARM it is not needed. Depthwise convolutions keep 8-bit weights
even then: their kernel cannot saturate (`eight_bit_weights`). By default the choice is read from
the converting machine's `/proc/cpuinfo` and recorded in the model with its reason, because the
device that runs the model may be another machine (`reduce_range=True/False` decides it explicitly).

The result stays a portable graph (docs/FORMAT.md): standard-domain `QuantizeLinear` /
`DequantizeLinear` around standard ops, opset 18 (both ops are version 13 there, per-axis scales
included, which onnxruntime 1.17 runs), IR 8. It is not optimized further offline: onnxruntime
fuses the QDQ pairs into its int8 kernels (QLinearConv, ...) when the device loads the graph
(ORT_ENABLE_ALL), for the CPU it runs on.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import platform
import tempfile
from collections.abc import Sequence
from importlib import metadata
from typing import Any

import numpy as np
import onnx

from edgetune.convert import frozen
from edgetune.convert.spec import Int8
from edgetune.data.progress import Progress
from edgetune.errors import UserError
from edgetune.runtime.dataset import Split, load_dataset

CALIBRATION_BATCH = 1     # images per calibration run: the histogram methods need equal shapes in every run
HELD_IMAGES = 8           # at most this many images' activations (~30 MB each for Lite0) are held at once
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def host_reduce_range(cpuinfo: str | os.PathLike = "/proc/cpuinfo", machine: str | None = None) -> tuple[bool, str]:
    """Whether this machine's CPU wants 7-bit weights (`reduce_range`), and why, in words.

    Args:
        cpuinfo: the kernel's CPU description (Linux); missing on other systems.
        machine: `platform.machine()` (a parameter so tests can pretend).

    Returns:
        `(reduce_range, reason)`: True on x86 without a VNNI flag, False with one and on other
        architectures (ARM's int8 kernels do not saturate).
    """
    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False, f"host CPU is {machine}, not x86: its int8 kernels do not saturate"
    try:
        with open(os.fspath(cpuinfo), encoding="utf-8", errors="replace") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return True, "host CPU flags unknown (no /proc/cpuinfo): assumed without VNNI"
    found = [flag for flag in VNNI_FLAGS if flag in flags]
    if found:
        return False, f"host CPU has VNNI ({', '.join(found)})"
    return True, f"host CPU has no VNNI ({'/'.join(VNNI_FLAGS)} absent): 7-bit weights avoid u8s8 saturation"


def calibration_indices(labels: np.ndarray, images: int) -> np.ndarray:
    """Pick `images` samples, the same number per class, spread evenly over each class's samples.

    Args:
        labels: the split's class ids, in sample order.
        images: how many in all; `ceil(images / classes)` per class (all of a smaller class).

    Returns:
        Sample indices, class by class; the same inputs always give the same pick.
    """
    classes = np.unique(labels)
    per_class = -(-int(images) // len(classes))
    picked = []
    for c in classes:
        members = np.flatnonzero(labels == c)
        take = min(per_class, len(members))
        picked.append(members[np.linspace(0, len(members) - 1, take).round().astype(np.int64)])
    return np.concatenate(picked)


def quantize_frozen(blob: bytes, input_name: str, preprocessing: dict[str, Any], spec: Int8,
                    num_classes: int | None = None) -> tuple[bytes, dict[str, Any]]:
    """Quantize an fp32 frozen graph to int8 (QDQ), calibrated on the dataset `spec.calibration`.

    Args:
        blob: the fp32 frozen graph (`frozen.optimize` output).
        input_name: its image input.
        preprocessing: the model's `meta.preprocessing`; calibration images go through it.
        spec: the options.
        num_classes: the model's class count; a dataset with another count is refused.

    Returns:
        `(quantized_blob, record)`: the portable QDQ graph and `meta.frozen.quantization`.

    Raises:
        UserError: bad options, an unusable dataset, a node to exclude that is not in the graph,
            or a result that is not a portable graph the device's checker admits.
    """
    spec.check()
    model = onnx.load_from_string(blob)
    names = {node.name for node in model.graph.node}
    unknown = sorted(set(spec.exclude) - names)
    if unknown:
        raise UserError(f"nodes to leave in fp32 {unknown} are not in the frozen graph")
    split = load_dataset(spec.calibration, preprocessing, num_classes=num_classes).train
    if len(np.unique(split.labels)) < (num_classes or 1):
        raise UserError(f"the calibration dataset {os.fspath(spec.calibration)} has classes without train "
                        f"images (the loader's split needs 3 images per class): prepare more images")
    picked = calibration_indices(split.labels, spec.images)
    reduce_range, why = host_reduce_range() if spec.reduce_range is None else (
        bool(spec.reduce_range), "set explicitly")
    quantized, eight_bit = _quantize(model, input_name, split, picked, spec, reduce_range)
    check_portable(quantized)
    frozen.check(quantized, input_name, tuple(_image_chw(model, input_name)))  # the device's own allow-list
    digest = hashlib.sha256("\n".join(sorted(split.keys[i] for i in picked)).encode()).hexdigest()
    record = {
        "scheme": "int8", "format": "QDQ", "tool": f"onnxruntime.quantization {metadata.version('onnxruntime')}",
        "weights": "int8, symmetric", "activations": "uint8, asymmetric",
        "per_channel": bool(spec.per_channel), "reduce_range": reduce_range, "reduce_range_reason": why,
        **({"eight_bit_depthwise": len(eight_bit)} if reduce_range else {}),
        "calibration": {"method": spec.method, "images": int(len(picked)), "split": split.name,
                        "per_class": "equal, spread evenly over each class", "images_sha256": digest,
                        **({"percentile": float(spec.percentile)} if spec.method == "percentile" else {})},
        "nodes_excluded": sorted(spec.exclude),
    }
    return quantized, record


def _image_chw(model: onnx.ModelProto, input_name: str) -> list[int]:
    """The fixed (C, H, W) of the frozen graph's image input."""
    value = next(v for v in model.graph.input if v.name == input_name)
    return [d.dim_value for d in value.type.tensor_type.shape.dim[1:]]


def _quantize(model: onnx.ModelProto, input_name: str, split: Split, picked: np.ndarray, spec: Int8,
              reduce_range: bool) -> tuple[bytes, list[str]]:
    """onnxruntime's pre-process + quantize_static in a temporary directory.

    Returns:
        The portable QDQ bytes, and the depthwise convolution weights kept at 8 bits under
        `reduce_range` (see `eight_bit_weights`).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy}[spec.method]
    # quantize_static hands the reader to the calibrator in windows of `stride` runs, each folded into
    # the ranges (minmax) or histograms (percentile, entropy) before the next: without it the histogram
    # calibrators hold every run's activations at once (300 Lite0 images: ~15 GB). Not
    # CalibMaxIntermediateOutputs: onnxruntime's MinMax calibrator drops the runs it holds when that
    # limit is reached instead of folding them in (onnxruntime 1.32, calibrate.py).
    reader = _Reader(split, picked, input_name)
    stride = max(d for d in range(1, HELD_IMAGES + 1) if len(reader) % d == 0)
    extra: dict[str, Any] = {"CalibStridedMinMax": stride}
    if spec.method == "percentile":
        extra["CalibPercentile"] = float(spec.percentile)
    with tempfile.TemporaryDirectory(prefix="edgetune-quantize-") as tmp:
        pre, out = os.path.join(tmp, "pre.onnx"), os.path.join(tmp, "int8.onnx")
        # onnxruntime's calibrators print notes on stdout, where the command's results go
        with contextlib.redirect_stdout(io.StringIO()):
            quant_pre_process(model, pre)
            kept = eight_bit_weights(onnx.load(pre)) if reduce_range else []
            axis = {"axis": 0} if spec.per_channel else {}
            extra["TensorQuantOverrides"] = {name: [{**axis, "reduce_range": False}] for name in kept}
            quantize_static(pre, out, reader, quant_format=QuantFormat.QDQ,
                            per_channel=spec.per_channel, reduce_range=reduce_range,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=method, nodes_to_exclude=list(spec.exclude), extra_options=extra)
        return frozen.portable(onnx.load(out)), kept


def eight_bit_weights(model: onnx.ModelProto) -> list[str]:
    """The weights that keep 8 bits under `reduce_range`: those of depthwise (grouped) convolutions.

    The saturation `reduce_range` avoids is in onnxruntime's u8s8 GEMM kernels (`vpmaddubsw` adds two
    u8 x s8 products in 16 bits); its depthwise convolution kernel widens to 16 bits before it
    multiplies and cannot saturate. Measured on Lite0 (Fashion-MNIST validation images): with 8-bit
    depthwise and 7-bit other weights the int8 kernels give the same features as the same graph
    computed in float (no saturation), and closer to fp32 than with every weight at 7 bits (relative
    error 0.25 against 0.29); with every weight at 8 bits the kernels saturate (0.46 against 0.19).
    """
    weights = {t.name for t in model.graph.initializer}
    return [node.input[1] for node in model.graph.node
            if node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in weights
            and next((a.i for a in node.attribute if a.name == "group"), 1) > 1]


class _Reader:
    """onnxruntime's CalibrationDataReader protocol: `get_next()` gives one input batch, then None;
    `set_range` limits it to a window of batches (for `CalibStridedMinMax`), `len` counts all."""

    def __init__(self, split: Split, picked: np.ndarray, input_name: str) -> None:
        self.split, self.input_name, self.picked = split, input_name, picked
        self.batches = [picked[i:i + CALIBRATION_BATCH] for i in range(0, len(picked), CALIBRATION_BATCH)]
        self.next, self.end = 0, len(self.batches)
        self.progress = Progress("calibrating the int8 frozen part", len(picked))

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.next, self.end = start_index, min(end_index, len(self.batches))

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.next >= self.end:
            if self.progress.done == len(self.picked) and self.end == len(self.batches):
                self.progress.close()
            return None
        idx = self.batches[self.next]
        self.next += 1
        batch = {self.input_name: self.split.images(idx)}
        self.progress.update(len(idx))
        return batch


def check_portable(blob: bytes) -> None:
    """The quantized graph must stay what docs/FORMAT.md promises: standard ops at opset 18, IR <= 8.

    Raises:
        UserError: another domain, opset or IR version, or no quantized node at all.
    """
    model = onnx.load_from_string(blob)
    opsets = [(o.domain or "", o.version) for o in model.opset_import]
    domains = sorted({node.domain for node in model.graph.node if node.domain not in ("", "ai.onnx")})
    if domains or opsets != [("", frozen.OPSET)] or model.ir_version > frozen.IR_VERSION:
        raise UserError(f"the quantized frozen part is not portable: opsets {opsets}, IR {model.ir_version}, "
                        f"other domains {domains}")
    if not any(node.op_type in QDQ_OPS for node in model.graph.node):
        raise UserError("quantization left no node in int8 (every node excluded?)")


def quantized_nodes(blob: bytes) -> Sequence[str]:
    """Names of the nodes of a QDQ graph that run in int8 (their inputs come from DequantizeLinear)."""
    model = onnx.load_from_string(blob)
    dq = {node.output[0] for node in model.graph.node if node.op_type == "DequantizeLinear"}
    return [node.name for node in model.graph.node
            if node.op_type not in QDQ_OPS and any(x in dq for x in node.input)]
