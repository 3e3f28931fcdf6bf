"""Which onnxruntime graph optimization level the device should load the frozen graph with.

The converter stores the frozen graph optimized offline at the *basic* level only (standard ops, no
CPU-specific layout: convert/frozen.py). The device may load it as is (``ORT_ENABLE_BASIC``) or let
onnxruntime add the extended and layout rewrites for the CPU at hand (``ORT_ENABLE_ALL``, what
``edgetune.runtime.frozen`` does). This measures both: the time to create the session and the time
to run a batch of images, interleaved, medians of ``--repeats``, with the thread count the device uses.

    python bench/ort_levels.py MODEL.tod [--images 32] [--threads 1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from edgetune.runtime.format import load_file
from edgetune.runtime.ort import onnxruntime

LEVELS = ("ORT_ENABLE_BASIC", "ORT_ENABLE_ALL")


def session(blob: bytes, level: str, threads: int):
    """An inference session of `blob` as the runtime makes one, at optimization `level`."""
    ort = onnxruntime()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    opts.log_severity_level = 3
    return ort.InferenceSession(blob, opts, providers=["CPUExecutionProvider"])


def main() -> None:
    """Print a table: level, median load seconds, median seconds for the images, max output difference."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a .tod model (its frozen graph is measured)")
    parser.add_argument("--images", type=int, default=32, help="images per timed run (default 32)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1, the device's)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per level (default 5)")
    parser.add_argument("--batch", type=int, default=4, help="images per session.run (the runtime's feature_batch)")
    args = parser.parse_args()

    tod = load_file(args.model)
    frozen = tod.meta["frozen"]
    blob = tod.blobs[frozen["blob"]]
    shape = tod.meta["input"]["shape"][1:]
    x = np.random.default_rng(0).uniform(-1, 1, (args.images, *shape)).astype(np.float32)
    load = {level: [] for level in LEVELS}
    run = {level: [] for level in LEVELS}
    outputs = {}
    for _ in range(args.repeats):
        for level in LEVELS:  # interleaved, so drifting machine load hits both alike
            start = time.perf_counter()
            sess = session(blob, level, args.threads)
            load[level].append(time.perf_counter() - start)
            start = time.perf_counter()
            out = [sess.run([frozen["output"]], {frozen["input"]: x[i:i + args.batch]})[0]
                   for i in range(0, len(x), args.batch)]
            run[level].append(time.perf_counter() - start)
            outputs[level] = np.concatenate(out)
    diff = float(np.abs(outputs[LEVELS[0]] - outputs[LEVELS[1]]).max())
    print(f"{args.images} images, batches of {args.batch}, {args.threads} thread(s), medians of {args.repeats}")
    print("| level | load s | run s | s per image |\n|---|---:|---:|---:|")
    for level in LEVELS:
        seconds = statistics.median(run[level])
        print(f"| {level} | {statistics.median(load[level]):.3f} | {seconds:.3f} | {seconds / args.images:.4f} |")
    print(f"max |basic - all| over the features: {diff:.2e}")


if __name__ == "__main__":
    main()
