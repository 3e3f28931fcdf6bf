"""Where edgetune's seed run spends its time: cProfile of net_runner plus three sweeps.

Run after ``bench/run.py`` has prepared ``bench/.work``: ``.venv/bin/python bench/profile_edgetune.py``.
Prints (1) the top of a cProfile of ``net_runner -c 60 -s 20`` by cumulative time, (2) the frozen
graph's time per image at several batch sizes, (3) onnxruntime session creation time per graph
optimization level, and (4) decode + preprocess time per image, split into its parts.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

from edgetune.cli import net_runner
from edgetune.runtime.dataset import load_dataset, preprocess
from edgetune.runtime.decode import open_image
from edgetune.runtime.format import load_file

BENCH = Path(__file__).resolve().parent


def profile_run(model: Path, data: Path, threads: int) -> str:
    """cProfile one seed run of net_runner (quiet); return the top 25 lines by cumulative time."""
    with tempfile.TemporaryDirectory(prefix="bench-prof-") as tmp:
        copy = Path(tmp) / model.name
        shutil.copyfile(model, copy)
        argv = ["net_runner", "-f", str(copy), "-d", str(data), "-c", "60", "-s", "20", "-q",
                "--threads", str(threads), "--target-accuracy", "1.01"]
        prof = cProfile.Profile()
        old, sys.argv = sys.argv, argv
        try:
            prof.runcall(net_runner.main)
        except SystemExit:
            pass
        finally:
            sys.argv = old
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(25)
    return out.getvalue()


def session(blob: bytes, threads: int, level: ort.GraphOptimizationLevel) -> ort.InferenceSession:
    """An onnxruntime CPU session like the runtime's, at the given optimization level."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = level
    return ort.InferenceSession(blob, opts, providers=["CPUExecutionProvider"])


def batch_sweep(blob: bytes, name: str, threads: int, images: np.ndarray) -> list[str]:
    """Milliseconds per image of the frozen graph at batch sizes 1..64 (best of 2 passes)."""
    sess = session(blob, threads, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    sess.run(None, {name: images[:1]})
    rows = []
    for batch in (1, 4, 8, 16, 32, 64):
        best = float("inf")
        for _ in range(2):
            start = time.perf_counter()
            for i in range(0, len(images), batch):
                sess.run(None, {name: images[i:i + batch]})
            best = min(best, time.perf_counter() - start)
        rows.append(f"  batch {batch:3d}: {1000 * best / len(images):6.1f} ms/image")
    return rows


def main() -> None:
    """Print the profile and the sweeps."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=BENCH / ".work")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    model, data = args.work / "transfer_learning_tod.tod", args.work / "data"
    tod = load_file(model)
    blob, name = tod.blobs[tod.meta["frozen"]["blob"]], tod.meta["frozen"]["input"]
    pre = tod.meta["preprocessing"]
    ds = load_dataset(data, pre, num_classes=tod.meta["num_classes"])
    print("== cProfile: net_runner seed run ==")
    print(profile_run(model, data, args.threads))
    print("== frozen graph, per image ==")
    print("\n".join(batch_sweep(blob, name, args.threads, ds.train.images(range(64)))))
    print("== session creation ==")
    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        start = time.perf_counter()
        session(blob, args.threads, level)
        print(f"  {level.name}: {time.perf_counter() - start:.2f} s")
    print("== decode + preprocess, per image (200 images) ==")
    paths = ds.train.paths[:200]
    start = time.perf_counter()
    raw = [Path(p).read_bytes() for p in paths]
    t_read = time.perf_counter() - start
    start = time.perf_counter()
    imgs = [open_image(b) for b in raw]
    t_decode = time.perf_counter() - start
    start = time.perf_counter()
    for img in imgs:
        preprocess(img, pre)
    t_pre = time.perf_counter() - start
    mean = np.float32(pre["mean"][0])
    inv = np.float32(1.0 / pre["std"][0])
    start = time.perf_counter()
    out = np.empty((len(imgs), 3, 224, 224), np.float32)
    for k, img in enumerate(imgs):
        hwc = np.asarray(img, dtype=np.uint8)
        np.subtract(hwc.transpose(2, 0, 1), mean, out=out[k], dtype=np.float32)
        out[k] *= inv
    t_fast = time.perf_counter() - start
    n = len(paths)
    print(f"  read {1000 * t_read / n:.2f} ms, decode (open_image) {1000 * t_decode / n:.2f} ms, "
          f"preprocess {1000 * t_pre / n:.2f} ms, preprocess into a preallocated batch with one "
          f"uint8->float pass {1000 * t_fast / n:.2f} ms")
    print(f"  images are {Image.open(paths[0]).size} already: no resize happens")


if __name__ == "__main__":
    main()
