"""Where an int8 frozen part loses accuracy: onnxruntime's qdq_loss_debug, node by node.

    .venv/bin/python bench/quant_debug.py --fp32 lite0.tod --int8 lite0_int8.tod --data /work/data/fm300 [--images 16]

Both frozen graphs are run with every intermediate tensor as an output (``qdq_loss_debug``'s
augmented models, graph optimizations off, so the QDQ graph runs as float arithmetic on quantized
values, without onnxruntime's int8 kernels) on validation images through the model's preprocessing.
For each tensor of the fp32 graph, in graph order, it prints the signal-to-quantization-noise ratio
(SQNR, dB; higher is better) of the int8 graph's value against the fp32 one (``xmodel``: the error
accumulated up to there) and the drop from the tensor that feeds it (where error comes in). The
nodes with the largest drops are the candidates for ``edgetune convert --keep-fp32``. A last line
compares the int8 graph run by the int8 kernels (all optimizations on) with the same graph run as
float arithmetic: a gap there is kernel saturation, not calibration (see ``reduce_range``).
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader
from onnxruntime.quantization.qdq_loss_debug import (collect_activations, compute_activation_error,
                                                     compute_signal_to_quantization_noice_ratio,
                                                     create_activation_matching,
                                                     modify_model_output_intermediate_tensors)

import common


class Images(CalibrationDataReader):
    """One image per run, as the calibration fed them."""

    def __init__(self, images: np.ndarray, name: str) -> None:
        self.images, self.name, self.i = images, name, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= len(self.images):
            return None
        self.i += 1
        return {self.name: self.images[self.i - 1:self.i]}

    def rewind(self) -> None:
        self.i = 0


def activations(blob: bytes, images: np.ndarray, name: str, tmp: Path, tag: str) -> dict[str, list[np.ndarray]]:
    """Every float tensor of a graph on every image (qdq_loss_debug's augmented model)."""
    plain, augmented = tmp / f"{tag}.onnx", tmp / f"{tag}_augmented.onnx"
    plain.write_bytes(blob)
    modify_model_output_intermediate_tensors(str(plain), str(augmented))
    return collect_activations(str(augmented), Images(images, name))


def run(blob: bytes, images: np.ndarray, name: str, level: ort.GraphOptimizationLevel) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    sess = ort.InferenceSession(blob, opts, providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {name: images[i:i + 1]})[0] for i in range(len(images))])


def main() -> None:
    """Print the per-tensor SQNR table and the kernel check."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fp32", type=Path, required=True)
    p.add_argument("--int8", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True, help="prepared dataset: its validation images are used")
    p.add_argument("--images", type=int, default=16, help="validation images, spread over the split (default 16)")
    p.add_argument("--top", type=int, default=10, help="list the nodes with the largest drops (default 10)")
    args = p.parse_args()
    meta, _, fp32 = common.load_model_meta(args.fp32)
    _, _, int8 = common.load_model_meta(args.int8)
    validation = common.load_splits(args.data, meta)[2]
    images = validation.images(np.linspace(0, len(validation) - 1, args.images).round().astype(int))
    name = meta["frozen"]["input"]
    with tempfile.TemporaryDirectory(prefix="quant-debug-") as tmp:
        float_acts = activations(fp32, images, name, Path(tmp), "fp32")
        int8_acts = activations(int8, images, name, Path(tmp), "int8")
    # each fp32 tensor against the value the int8 graph's next op consumes (its DequantizeLinear output)
    errors = compute_activation_error(create_activation_matching(int8_acts, float_acts))
    graph = onnx.load_from_string(fp32).graph
    # a tensor the int8 graph never materializes (a Conv output whose Clip the quantizer folded away)
    # carries its inputs' SQNR and its node's name, so the next measured tensor's drop names both nodes
    sqnr: dict[str, float] = {name: math.inf}
    via: dict[str, list[str]] = {}
    rows = []
    for node in graph.node:
        before = min((sqnr[i] for i in node.input if i in sqnr), default=math.inf)
        nodes = [n for i in node.input for n in via.get(i, [])] + [node.name]
        for out in node.output:
            if "xmodel_err" in errors.get(out, {}):
                sqnr[out] = errors[out]["xmodel_err"]
                rows.append((" + ".join(nodes), node.op_type, out, sqnr[out], before - sqnr[out]))
            else:
                sqnr[out], via[out] = before, nodes
    print(f"{args.images} validation images of {args.data}; SQNR in dB of each quantized tensor, int8 vs fp32 "
          f"(higher is better); drop: from the node's worst input to its output\n")
    print("| node | op | SQNR | drop |\n|---|---|---:|---:|")
    for node, op, _, value, drop in rows:
        print(f"| {node} | {op} | {value:.1f} | {drop:.1f} |")
    worst = sorted((r for r in rows if math.isfinite(r[4])), key=lambda r: -r[4])[:args.top]
    print(f"\nlargest drops: {', '.join(f'{r[0]} ({r[1]}, {r[4]:.1f} dB)' for r in worst)}")
    kernels = run(int8, images, name, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    emulated = run(int8, images, name, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    reference = run(fp32, images, name, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    print(f"features SQNR vs fp32: int8 kernels {compute_signal_to_quantization_noice_ratio(reference, kernels):.1f} dB, "
          f"the same graph as float arithmetic {compute_signal_to_quantization_noice_ratio(reference, emulated):.1f} dB "
          f"(a gap means the int8 kernels saturate)")


if __name__ == "__main__":
    main()
