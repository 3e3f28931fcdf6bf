"""The frozen part: cut it out of a graph, optimize it offline with onnxruntime, check it on the host.

onnxscript's optimizer first folds constants and BatchNorm into the convolutions (the training
graph is exported unoptimized, so that no trainable initializer is folded away), then
onnxruntime's *basic* level is applied offline (standard-op fusions, redundant-node removal): its
output uses only standard ONNX ops, so it stays portable across CPUs and onnxruntime builds. The
extended and layout levels would bake in contrib ops and the host CPU's memory layout, so they are
left to the device: it loads the graph with every level on, for its own CPU (runtime/frozen.py,
where the measurement is: 2.3x faster inference for a load time within the noise). The IR version
is lowered to 8 (the one that goes with opset 18) and only the used opset domains are kept, so
onnxruntime 1.17 loads it.

The input is untrusted (a model zoo's ONNX file): `check_source` refuses external data, functions,
control flow, non-standard domains and oversized declared tensors before onnxscript or onnxruntime
fold anything, and `check` runs the device's own check (`edgetune.runtime.graph_check`: op
allow-list, inferred sizes, memory) on the frozen part before it is probed or written.
"""

from __future__ import annotations

import os
import sys
import tempfile

import numpy as np
import onnx
import onnx.version_converter
import onnxscript.optimizer

from edgetune.errors import UserError
from edgetune.runtime.bounds import MAX_SIDE
from edgetune.runtime.graph_check import UnsafeGraph, admit_frozen_graph, scan_model
from edgetune.runtime.ort import onnxruntime

ort = onnxruntime()  # the host always needs it here: optimize and probe the frozen part

OPSET = 18
IR_VERSION = 8
FEATURES = "features"
BATCH = "N"


def check_source(model: onnx.ModelProto, chw: tuple[int, ...]) -> None:
    """Refuse an input graph that is not code-free data of bounded size, before anything runs it.

    Raises:
        UserError: external data, functions, subgraphs (control flow), a non-standard op domain,
            a declared tensor or constant shape over the limit (`graph_check.scan_model`), or an
            image size that is not 3 positive dims up to `MAX_SIDE`.
    """
    if len(chw) != 3 or not all(type(d) is int and 0 < d <= MAX_SIDE for d in chw):
        raise UserError(f"the model's image size {list(chw)} is not (C, H, W) with sides up to {MAX_SIDE}")
    try:
        scan_model(model.SerializeToString(), chw)
    except UnsafeGraph as e:
        raise UserError(f"the ONNX model is refused: {e}") from None


def check(blob: bytes, input_name: str, chw: tuple[int, ...]) -> None:
    """The device's check of a frozen part (`graph_check.admit_frozen_graph`), run before writing it.

    Raises:
        UserError: an op outside the allow-list, a size over the limit, or more memory than there is.
    """
    try:
        admit_frozen_graph(blob, (input_name, FEATURES), chw, images=2)
    except UnsafeGraph as e:
        raise UserError(f"the frozen part cannot go to the device: {e}") from None


def extract(model: onnx.ModelProto, input_name: str, cut: str) -> onnx.ModelProto:
    """The subgraph from `input_name` to `cut`, the cut renamed `features`, with a dynamic batch dim."""
    sub = onnx.utils.Extractor(model).extract_model([input_name], [cut])
    if _opset(sub) != OPSET:
        try:
            sub = onnx.version_converter.convert_version(sub, OPSET)
        except Exception as e:  # the converter raises bare RuntimeErrors for unconvertible ops
            raise UserError(f"cannot convert the backbone from opset {_opset(sub)} to {OPSET}: {e}") from None
    graph = sub.graph
    for node in graph.node:
        node.input[:] = [FEATURES if x == cut else x for x in node.input]
        node.output[:] = [FEATURES if x == cut else x for x in node.output]
    out = graph.output[0]
    out.name = FEATURES
    del graph.value_info[:]  # shapes inferred for a fixed batch would contradict the dynamic one
    for value in (graph.input[0], out):
        dims = value.type.tensor_type.shape.dim
        if len(dims):
            dims[0].Clear()
            dims[0].dim_param = BATCH
    del sub.metadata_props[:]
    return sub


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def optimize(model: onnx.ModelProto) -> bytes:
    """Fold constants and BatchNorm (onnxscript), then onnxruntime's offline basic level; return the bytes."""
    print("optimizing the frozen part (onnxscript, then onnxruntime basic level)...", file=sys.stderr)
    model = onnxscript.optimizer.optimize(model)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.intra_op_num_threads = 1
    with tempfile.TemporaryDirectory() as tmp:
        opts.optimized_model_filepath = os.path.join(tmp, "frozen.onnx")
        try:
            ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for bad graphs
            raise UserError(f"onnxruntime cannot load the frozen part: {e}") from None
        optimized = onnx.load(opts.optimized_model_filepath)
    return portable(optimized)


def portable(model: onnx.ModelProto) -> bytes:
    """IR lowered to 8, only the opset domains the nodes use, no metadata; return the bytes.

    onnxruntime and its quantization tools stamp every domain they know (e.g. ai.onnx.ml 5, com.microsoft),
    which older onnxruntime releases refuse even when no node uses them.
    """
    model.ir_version = min(model.ir_version, IR_VERSION)
    used = {node.domain or "" for node in model.graph.node} | {""}
    kept = [o for o in model.opset_import if (o.domain or "") in used]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    del model.metadata_props[:]
    model.producer_name, model.producer_version = "edgetune", ""
    return model.SerializeToString()


def probe(blob: bytes, input_name: str, chw: tuple[int, int, int]) -> tuple[int, ...]:
    """Run the frozen part on batches of 1 and 2; return the per-image shape of its output (F,) or (C, H, W).

    Raises:
        UserError: the graph does not run, or its output is not (N, F) or (N, C, H, W) with the same
            per-image shape for both batch sizes.
    """
    sess = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    shapes = set()
    for n in (1, 2):
        try:
            (out,) = sess.run([FEATURES], {input_name: np.zeros((n, *chw), np.float32)})
        except Exception as e:  # onnxruntime's own error types
            raise UserError(f"the frozen part does not run on a batch of {n}: {e}") from None
        if out.ndim not in (2, 4) or out.shape[0] != n:
            raise UserError(f"the cut tensor must be (N, features) or (N, C, H, W); on a batch of {n} it is {out.shape}")
        shapes.add(tuple(int(d) for d in out.shape[1:]))
    if len(shapes) != 1:
        raise UserError(f"the cut tensor's per-image shape depends on the batch size: {sorted(shapes)}")
    return shapes.pop()
