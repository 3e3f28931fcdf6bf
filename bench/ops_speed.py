"""Per-call speed of the fine-tuning ops (edgetune.runtime.ops) at EfficientNet-Lite0's shapes, batch 32.

Each row is one node of Lite0's last block(s) and head with its real shapes: forward and backward
(gradients for every input that trains; the first conv after the cut skips its input gradient, as
the engine does), median of `--repeat` calls, float32, inputs in the channels-last memory the
convs produce. Next to it, the same node in PyTorch eager (forward + autograd backward), for
scale. A table on stdout; timings depend on the machine's load.

    python bench/ops_speed.py [--batch 32] [--repeat 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import numpy as np


def _median_ms(fn: Callable[[], object], repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def _channels_last(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


def cases(n: int) -> list[tuple[str, str, dict, list[tuple[int, ...]], tuple[bool, ...]]]:
    """(label, op type, attributes, input shapes, needs_grad) for Lite0's block 15, head and block 11."""
    return [
        ("blk15 expand 1x1 192->1152 @7 (after cut)", "Conv", {}, [(n, 192, 7, 7), (1152, 192, 1, 1)], (False, True)),
        ("blk15 BN 1152 @7 (frozen stats)", "BatchNormalization", {"epsilon": 1e-3},
         [(n, 1152, 7, 7), (1152,), (1152,), (1152,), (1152,)], (True, True, True, False, False)),
        ("blk15 ReLU6 (Clip) 1152 @7", "Clip", {}, [(n, 1152, 7, 7), (), ()], (True, False, False)),
        ("blk15 depthwise 3x3 s1 1152 @7", "Conv", {"group": 1152, "pads": [1, 1, 1, 1]},
         [(n, 1152, 7, 7), (1152, 1, 3, 3)], (True, True)),
        ("blk15 project 1x1 1152->320 @7", "Conv", {}, [(n, 1152, 7, 7), (320, 1152, 1, 1)], (True, True)),
        ("conv_head 1x1 320->1280 @7", "Conv", {}, [(n, 320, 7, 7), (1280, 320, 1, 1)], (True, True)),
        ("pool ReduceMean 1280 @7", "ReduceMean", {"keepdims": 1}, [(n, 1280, 7, 7), (2,)], (True, False)),
        ("blk11 expand 1x1 112->672 @14 (after cut)", "Conv", {}, [(n, 112, 14, 14), (672, 112, 1, 1)], (False, True)),
        ("blk11 depthwise 5x5 s2 672 @14->7", "Conv", {"group": 672, "strides": [2, 2], "pads": [1, 1, 2, 2]},
         [(n, 672, 14, 14), (672, 1, 5, 5)], (True, True)),
        ("blk12 depthwise 5x5 s1 1152 @7", "Conv", {"group": 1152, "pads": [2, 2, 2, 2]},
         [(n, 1152, 7, 7), (1152, 1, 5, 5)], (True, True)),
        ("blk12 residual Add 192 @7", "Add", {}, [(n, 192, 7, 7), (n, 192, 7, 7)], (True, True)),
    ]


def _torch_fn(op_type: str, attrs: dict):
    import torch.nn.functional as F

    if op_type == "Conv":
        top, left, bottom, right = attrs.get("pads", [0, 0, 0, 0])
        stride, group = attrs.get("strides", [1, 1])[0], attrs.get("group", 1)
        return lambda x, w: F.conv2d(F.pad(x, (left, right, top, bottom)), w, stride=stride, groups=group)
    if op_type == "BatchNormalization":
        return lambda x, s, b, m, v: F.batch_norm(x, m, v, s, b, False, 0.0, attrs["epsilon"])
    if op_type == "Clip":
        return lambda x, lo, hi: F.relu6(x)
    if op_type == "ReduceMean":
        return lambda x, axes: x.mean((2, 3), keepdim=True)
    return lambda a, b: a + b


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--threads", type=int, default=2, help="torch threads (numpy's BLAS: set OPENBLAS_NUM_THREADS)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch column")
    args = p.parse_args()
    from edgetune.runtime.ops import get_op

    torch = None
    if not args.no_torch:
        import torch

        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"batch {args.batch}, float32, median of {args.repeat} calls, torch {args.threads} threads, "
          f"load average {os.getloadavg()[0]:.1f} (timings are noisy under load)\n")
    print("| node | numpy fwd ms | numpy bwd ms | torch fwd+bwd ms |")
    print("|---|---:|---:|---:|")
    total = [0.0, 0.0, 0.0]
    for label, op_type, attrs, shapes, needs in cases(args.batch):
        inputs = []
        for shape in shapes:
            if op_type == "ReduceMean" and len(shapes[0]) == 4 and shape == (2,):
                inputs.append(np.array([2, 3], dtype=np.int64))
            elif op_type == "Clip" and shape == ():
                inputs.append(np.float32(0.0 if len(inputs) == 1 else 6.0))
            elif op_type == "BatchNormalization" and len(inputs) == 4:
                inputs.append(rng.uniform(0.5, 2.0, shape).astype(np.float32))
            else:
                a = rng.standard_normal(shape).astype(np.float32)
                inputs.append(_channels_last(a) if a.ndim == 4 else a)
        op = get_op(op_type)(**attrs)
        op.needs_grad = needs
        y = op.forward(*inputs)
        grad = _channels_last(rng.standard_normal(y.shape).astype(np.float32))
        fwd = _median_ms(lambda: op.forward(*inputs), args.repeat)
        bwd = _median_ms(lambda: op.backward(grad), args.repeat)
        ref = float("nan")
        if torch is not None:
            fn = _torch_fn(op_type, attrs)
            ts = [torch.from_numpy(np.ascontiguousarray(a)).requires_grad_(bool(need) and a.dtype == np.float32)
                  for a, need in zip(inputs, needs, strict=True)]
            g = torch.from_numpy(np.ascontiguousarray(grad))

            def step():
                for t in ts:
                    t.grad = None
                fn(*ts).backward(g)

            ref = _median_ms(step, args.repeat)
        total = [total[0] + fwd, total[1] + bwd, total[2] + ref]
        print(f"| {label} | {fwd:.2f} | {bwd:.2f} | {ref:.2f} |")
    print(f"| sum of the rows | {total[0]:.2f} | {total[1]:.2f} | {total[2]:.2f} |")


if __name__ == "__main__":
    main()
