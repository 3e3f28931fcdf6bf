"""Which int8 variant of the frozen part runs fastest on this CPU, and what each costs in accuracy.

    .venv/bin/python bench/quant_variants.py --model /work/data/lite0.tod --data /work/data/fm300 \\
        [--variants u8s8_rr,u8u8,...] [--images 32] [--repeats 5] [--no-probe]

Every variant is made from the model's fp32 frozen part with onnxruntime's own tools and edgetune's
recipe (`edgetune.convert.quantize`: `quant_pre_process`, then `quantize_static` in QDQ format,
calibration on `Int8()`'s default images and method from the dataset's train split), changing one
thing: the weight or activation type, `reduce_range`, per-channel scales, nodes left out of the
quantization, or an onnxruntime session entry. The calibration runs once: its ranges are shared
through onnxruntime's calibration cache, so variants differ only in what they change. Every file
stays a portable standard-op QDQ graph (`quantize.check_portable`).

For each variant it prints, on the frozen part alone (images decoded into memory first, batches of
`Context().feature_batch` as the runtime sends them, onnxruntime at ORT_ENABLE_ALL as
`edgetune.runtime.frozen` loads it; variants interleaved round-robin, medians of `--repeats`):
ms per image on 2 threads and on 1 thread and the ratio to fp32; the time per onnxruntime op type
(its profiler, 1 thread; `Conv` kinds split into pointwise, depthwise and full); the features'
fidelity to fp32 on the validation images (per-image cosine and relative error, top-1 agreement of
the 1000 logits); and with the probe, the validation accuracy of a converged logistic regression on
each variant's features (`quant_accuracy.probe`, L2 chosen on test) next to fp32's.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import io
import json
import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

import common
import quant_accuracy
import run
from edgetune.convert import frozen, quantize
from edgetune.convert.spec import Int8
from edgetune.runtime import Context


@dataclass(frozen=True)
class Variant:
    """One way to make and load the int8 frozen part: `quantize_static` options and session options."""

    what: str
    weight_type: QuantType = QuantType.QInt8
    activation_type: QuantType = QuantType.QUInt8
    reduce_range: bool = True
    per_channel: bool = True
    exclude: str = ""                                    # "", "depthwise", "stem": node group left out
    session: dict[str, str] = field(default_factory=dict)  # session config entries


VARIANTS = {
    "u8s8_rr": Variant("today: u8 activations, s8 weights, reduce_range (depthwise 8-bit), per-channel"),
    "u8s8_8bit": Variant("u8s8 with 8-bit weights everywhere (saturates on AVX2)", reduce_range=False),
    "u8s8_8bit_x64prec": Variant("u8s8 8-bit + session.x64quantprecision=1 (runtime turns wide weights to u8u8)",
                                 reduce_range=False, session={"session.x64quantprecision": "1"}),
    "u8u8": Variant("u8 weights (asymmetric, 8-bit: no saturation)", weight_type=QuantType.QUInt8,
                    reduce_range=False),
    "per_tensor": Variant("today's, one weight scale per tensor", per_channel=False),
    "dw_fp32": Variant("today's, depthwise convs excluded (fp32)", exclude="depthwise"),
    "stem_fp32": Variant("today's, stem conv (3 input channels) fp32", exclude="stem"),
    "s8s8": Variant("s8 activations (the runtime converts them to u8)", activation_type=QuantType.QInt8),
    "s8s8_int8allowed": Variant("s8 activations + session.qdqisint8allowed=1 (kept s8)",
                                activation_type=QuantType.QInt8, session={"session.qdqisint8allowed": "1"}),
}


METHODS = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
           "entropy": CalibrationMethod.Entropy}


def conv_groups(model: onnx.ModelProto) -> dict[str, str]:
    """Each Conv node's kind: `dw` (depthwise), `pw` (1x1) or `full` (the stem's 3x3 over the image)."""
    kinds = {}
    for node in model.graph.node:
        if node.op_type == "Conv":
            attr = {a.name: a for a in node.attribute}
            group = attr["group"].i if "group" in attr else 1
            kinds[node.name] = "dw" if group > 1 else (
                "pw" if list(attr["kernel_shape"].ints) == [1, 1] else "full")
    return kinds


def build(pre: str, variant: Variant, kinds: dict[str, str], reader: quantize._Reader, cache: str, out: str) -> str:
    """Quantize the pre-processed graph `pre` as `variant` asks, like `quantize._quantize` does."""
    eight_bit = quantize.eight_bit_weights(onnx.load(pre)) if variant.reduce_range else []
    axis = {"axis": 0} if variant.per_channel else {}
    group = {"depthwise": "dw", "stem": "full"}.get(variant.exclude)
    extra = {"CalibStridedMinMax": max(d for d in range(1, quantize.HELD_IMAGES + 1) if len(reader) % d == 0),
             "CalibPercentile": Int8.percentile,
             "TensorQuantOverrides": {name: [{**axis, "reduce_range": False}] for name in eight_bit}}
    quiet = contextlib.redirect_stderr(io.StringIO()) if os.path.exists(cache) else contextlib.nullcontext()
    with contextlib.redirect_stdout(io.StringIO()), quiet:  # onnxruntime's notes; the progress bar once
        quantize_static(pre, out, reader, quant_format=QuantFormat.QDQ, per_channel=variant.per_channel,
                        reduce_range=variant.reduce_range, activation_type=variant.activation_type,
                        weight_type=variant.weight_type, calibrate_method=METHODS[Int8.method],
                        nodes_to_exclude=[n for n, k in kinds.items() if k == group], extra_options=extra,
                        calibration_cache_path=cache)
    blob = frozen.portable(onnx.load(out))
    quantize.check_portable(blob)
    Path(out).write_bytes(blob)
    return out


def session(path: str, threads: int, variant: Variant | None, profile: str | None = None) -> ort.InferenceSession:
    """The runtime's session (`edgetune.runtime.frozen._inference_session`) plus the variant's entries."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    for key, value in (variant.session if variant else {}).items():
        opts.add_session_config_entry(key, value)
    if profile:
        opts.enable_profiling, opts.profile_file_prefix = True, profile
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"],
                                disabled_optimizers=["WeightBiasQuantization"])  # as the runtime


def features(sess: ort.InferenceSession, images: np.ndarray, batch: int) -> np.ndarray:
    """The frozen part's output for `images`, in batches of `batch`."""
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: images[i:i + batch]})[0] for i in range(0, len(images), batch)])


def op_times(path: str, variant: Variant | None, images: np.ndarray, batch: int, kinds: dict[str, str],
             tmp: str) -> dict[str, float]:
    """ms per image per op type on 1 thread (onnxruntime's profiler); Conv kinds by the node's name."""
    sess = session(path, 1, variant, profile=os.path.join(tmp, "profile"))
    features(sess, images, batch)
    events = json.loads(Path(sess.end_profiling()).read_text())
    times: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op = e["args"]["op_name"]
            node = re.sub(r"(_token_\d+)?_kernel_time$", "", e["name"])
            if "Conv" in op:  # fp32 convs (NCHWc) are renamed: classify by the weight's shape instead
                shapes = [list(s.values())[0] for s in e["args"].get("input_type_shape", [])]
                w = next((s for s in shapes[1:] if len(s) == 4), None)
                kind = kinds.get(node) or (w and ("dw" if w[1] == 1 else "pw" if w[2:] == [1, 1] else "full"))
                op = f"{op}/{kind or '?'}"
            times[op] += e["dur"] / 1e3 / len(images)
    return dict(times.most_common())


def main() -> None:
    """Build the variants, time them interleaved, profile them, measure their accuracy; print tables."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="a .tod with an fp32 frozen part")
    p.add_argument("--data", type=Path, required=True, help="a prepared dataset (calibration, fidelity, probe)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from: {', '.join(VARIANTS)}")
    p.add_argument("--images", type=int, default=32, help="validation images per timed pass (default 32)")
    p.add_argument("--repeats", type=int, default=5, help="timed passes per variant and thread count (default 5)")
    p.add_argument("--no-probe", action="store_true", help="skip the probe (it runs every variant on every split)")
    p.add_argument("--work", type=Path, default=Path(__file__).resolve().parent / ".work" / "variants",
                   help="built variants and the calibration cache (reused when present)")
    args = p.parse_args()
    names = [n for n in args.variants.split(",") if n]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        sys.exit(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    args.work.mkdir(parents=True, exist_ok=True)
    meta, _, blob = common.load_model_meta(args.model)
    if meta["frozen"].get("quantization"):
        sys.exit(f"{args.model}: its frozen part is already quantized; give the fp32 model")
    train, test, val = common.load_splits(args.data, meta)
    batch = Context().feature_batch
    fp32, pre = str(args.work / "fp32.onnx"), str(args.work / "pre.onnx")
    Path(fp32).write_bytes(blob)
    with contextlib.redirect_stdout(io.StringIO()):
        quant_pre_process(onnx.load_from_string(blob), pre)
    kinds = conv_groups(onnx.load(pre))
    picked = quantize.calibration_indices(train.labels, Int8.images)
    cache = str(args.work / f"calibration-{hashlib.sha256(blob).hexdigest()[:16]}-{args.data.name}-"
                            f"{Int8.method}-{Int8.images}.json")
    files = {"fp32": (fp32, None)}
    for name in names:
        out = str(args.work / f"{name}.onnx")
        started = time.perf_counter()
        build(pre, VARIANTS[name], kinds, quantize._Reader(train, picked, meta["frozen"]["input"]), cache, out)
        print(f"built {name} in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        files[name] = (out, VARIANTS[name])

    images = val.images(np.arange(min(args.images, len(val))))
    ms: dict[tuple[str, int], float] = {}
    when, load = time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()), os.getloadavg()[0]
    for threads in (2, 1):
        sessions = {n: session(path, threads, v) for n, (path, v) in files.items()}
        runs: dict[str, list[float]] = {n: [] for n in files}
        for r in range(args.repeats + 1):  # the first pass warms up and is not counted
            for n, sess in sessions.items():
                started = time.perf_counter()
                features(sess, images, batch)
                if r:
                    runs[n].append((time.perf_counter() - started) * 1e3 / len(images))
        ms.update({(n, threads): statistics.median(t) for n, t in runs.items()})
        del sessions
    with tempfile.TemporaryDirectory(prefix="quant-variants-") as tmp:
        ops = {n: op_times(path, v, images, batch, kinds, tmp) for n, (path, v) in files.items()}

    print(f"{when}; CPU: {run.cpu_model()}; onnxruntime {ort.__version__}; load average {load:.1f} "
          f"when the timing started. Frozen part of {args.model.name}, "
          f"{len(images)} {args.data.name} validation images in batches of {batch}, medians of {args.repeats} "
          f"interleaved passes. Calibration: {Int8.method} {Int8.percentile}, {len(picked)} train images.\n")
    feats = {n: split_features(path, v, (val,), batch, args.work) for n, (path, v) in files.items()}
    print("| variant | what | ms/img 2 threads | / fp32 | ms/img 1 thread | / fp32 | cos min / mean "
          "| rel err mean / max | top-1 agreement |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for n, (_, v) in files.items():
        fid = quant_accuracy.fidelity(feats["fp32"]["validation"], feats[n]["validation"])
        print(f"| {n} | {v.what if v else 'fp32 (the model as converted)'} | {ms[n, 2]:.2f} "
              f"| {ms[n, 2] / ms['fp32', 2]:.2f}x | {ms[n, 1]:.2f} | {ms[n, 1] / ms['fp32', 1]:.2f}x "
              f"| {fid['cos_min']:.3f} / {fid['cos_mean']:.3f} | {fid['rel_mean']:.3f} / {fid['rel_max']:.3f} "
              f"| {fid['top1']:.3f} |")
    print("\nms per image by onnxruntime op type, 1 thread (profiler; Conv split into pw = 1x1, "
          "dw = depthwise, full = the stem):\n")
    for n, times in ops.items():
        print(f"- {n} (total {sum(times.values()):.2f}): "
              + ", ".join(f"{op} {t:.2f}" for op, t in times.items() if t >= 0.01))
    if args.no_probe:
        return
    print("\n| variant | probe val (test, l2) | probe val - fp32 |\n|---|---:|---:|", flush=True)
    base = None
    for n, (path, v) in files.items():
        l2, test_acc, val_acc = quant_accuracy.probe(split_features(path, v, (train, test, val), batch, args.work))
        base = val_acc if base is None else base
        print(f"| {n} | {val_acc:.4f} ({test_acc:.4f}, {l2:g}) | "
              f"{'—' if n == 'fp32' else f'{100 * (val_acc - base):+.2f} points'} |", flush=True)


def split_features(path: str, variant: Variant | None, splits: tuple, batch: int, work: Path) -> dict[str, np.ndarray]:
    """The variant's features and labels of `splits` (2 threads), kept in `work` keyed by file and session."""
    key = hashlib.sha256(Path(path).read_bytes() + repr(variant and variant.session).encode())
    out = {}
    for split in splits:
        cached = work / f"features-{key.hexdigest()[:16]}-{split.name}-{len(split)}.npy"
        if not cached.exists():
            sess = session(path, 2, variant)
            rows = []
            for start in range(0, len(split), 64):
                rows.append(features(sess, split.images(np.arange(start, min(start + 64, len(split)))), batch))
                print(f"\r{Path(path).stem} {split.name}: {start + len(rows[-1])}/{len(split)}", end="",
                      file=sys.stderr, flush=True)
            print(file=sys.stderr)
            np.save(cached, np.concatenate(rows))
        out[split.name], out[f"{split.name}_labels"] = np.load(cached), split.labels
    return out


if __name__ == "__main__":
    main()
