"""Speed of fine-tuning per `--trainable` choice: edgetune next to PyTorch eager at the same cut (issue 11).

Two tables, each from one run with the systems interleaved round-robin:

1. **Whole seed run** on the demo's work unit (default `/work/data/fm100`: 1000 images, 60 steps of
   batch 32, test accuracy and a checkpoint every 20 steps, validation at the end) for `head`,
   `last-block` and `last-stage`: edgetune's `net_runner` on the choice's `.tod` (its default
   recipe), and PyTorch eager doing the same fine-tuning with its own cache at the same cut
   (`bench/sys_torch_finetune.py`; for `head`, `bench/sys_torch_cache.py`). Each is a child process
   measured from outside by `bench/measure.py` (wall, first step, peak RSS). Median of `--reps`.
2. **One training step** at batch 32 on random cut tensors (forward, backward, update; median of
   `--step-samples` after two warm-up steps), edgetune's numpy engine vs PyTorch eager on the same
   tail, each in a child process limited to `--threads` threads (BLAS and OpenMP pools too, through
   `OPENBLAS_NUM_THREADS`/`OMP_NUM_THREADS`, as a user would limit either).

The goals it checks: last-block's whole seed run at most 2x the head's, and edgetune faster than
PyTorch at the same cut. Times depend on the machine's load: run it on a quiet machine.

    python bench/finetune_speed.py [--data DIR] [--reps 3] [--threads N] [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))  # run as a script from a checkout

from bench import measure  # noqa: E402
from bench.measure import fmt, median  # noqa: E402
from bench.finetune import BATCH, CHOICES, FIRST_BLOCK, build  # noqa: E402
from edgetune.runtime.bounds import available_cores  # noqa: E402

SEED_STEPS = 60


def seed_command(system: str, choice: str, tod: Path, data: Path, out: Path, threads: int) -> list[str]:
    """The child that runs one whole seed run of `system` ("edgetune" or "torch") for `choice`."""
    if system == "edgetune":
        copy = out / tod.name  # checkpoints land next to the model
        copy.write_bytes(tod.read_bytes())
        return [str(Path(sys.executable).parent / "net_runner"), "-f", str(copy), "-d", str(data),
                "-c", str(SEED_STEPS), "-s", "20", "--threads", str(threads), "--target-accuracy", "1.01",
                "--seed", "0"]
    script = "sys_torch_cache.py" if choice == "head" else "sys_torch_finetune.py"
    return [sys.executable, str(BENCH / script), "--model", str(tod), "--data", str(data), "--steps",
            str(SEED_STEPS), "--threads", str(threads), "--out", str(out), "--extra", choice]


def thread_env(threads: int) -> dict[str, str]:
    """Limit every thread pool of a child (BLAS, OpenMP) to `threads`."""
    return {"OPENBLAS_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def step_ms(engine: str, choice: str, tod: Path, threads: int, samples: int) -> float:
    """One training step's median time in a child process limited to `threads` threads."""
    cmd = [sys.executable, str(Path(__file__)), "step", "--engine", engine, "--choice", choice, "--tod", str(tod),
           "--threads", str(threads), "--step-samples", str(samples)]
    out = subprocess.run(cmd, env={**os.environ, **thread_env(threads)}, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"step timing failed ({engine}, {choice}):\n{out.stderr[-2000:]}")
    return float(out.stdout.split()[-1])


def time_step(engine: str, choice: str, tod: Path, threads: int, samples: int) -> float:
    """(In the child.) Median ms of a training step at batch 32 on random cut tensors."""
    rng = np.random.default_rng(0)
    if engine == "edgetune":
        from edgetune.runtime.session import Context, TrainSession

        session = TrainSession.create(tod, Context(threads=threads))
        width, classes = session.meta["frozen"]["features"], session.num_classes

        def step() -> None:
            session.run_head(rng.normal(0, 1, (BATCH, width)).astype(np.float32), rng.integers(0, classes, BATCH))
    else:
        import torch

        sys.path.insert(0, str(BENCH))  # the system scripts' own imports
        import common
        import torch_model
        from sys_torch_finetune import batch_statistics, optimizer, tail_for

        torch.set_num_threads(threads)
        meta, params, _ = common.load_model_meta(tod)
        tail = tail_for(choice, params, torch_model.backbone())
        tail.use_batch_statistics(batch_statistics(meta), True)  # as the model's BatchNorm nodes train
        opt = optimizer(meta, tail)
        shape = (1000,) if FIRST_BLOCK[choice] is None else tuple(meta["frozen"]["shape"])
        classes = meta["num_classes"]

        def step() -> None:
            x = torch.from_numpy(rng.normal(0, 1, (BATCH, *shape)).astype(np.float32))
            y = torch.from_numpy(rng.integers(0, classes, BATCH))
            opt.zero_grad()
            torch.nn.functional.cross_entropy(tail(x), y).backward()
            opt.step()
    times = []
    for _ in range(samples + 2):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[2:])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", nargs="?", default="bench", choices=["bench", "step"], help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, default=Path("/work/data/fm100"), help="the seed run's dataset")
    p.add_argument("--choices", default=",".join(CHOICES), help="comma-separated (default: all three)")
    p.add_argument("--reps", type=int, default=3, help="repetitions of each seed run (default 3)")
    p.add_argument("--threads", type=int, default=available_cores(), help="threads for every system (default: all cores)")
    p.add_argument("--step-samples", type=int, default=10, help="timed steps per step-time median (default 10)")
    p.add_argument("--work", type=Path, default=Path("bench-finetune"), help="models (default ./bench-finetune)")
    p.add_argument("--engine", choices=["edgetune", "torch"], help=argparse.SUPPRESS)
    p.add_argument("--choice", help=argparse.SUPPRESS)
    p.add_argument("--tod", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run both tables and print them as Markdown."""
    args = parse_args(argv)
    if args.mode == "step":
        print(f"{time_step(args.engine, args.choice, args.tod, args.threads, args.step_samples):.3f}")
        return 0
    choices = [c.strip() for c in args.choices.split(",") if c.strip()]
    unknown = sorted(set(choices) - set(CHOICES))
    if unknown:
        raise SystemExit(f"unknown choices {unknown}; known: {', '.join(CHOICES)}")
    args.work.mkdir(parents=True, exist_ok=True)
    tods = {c: build(args.data, c, args.work) for c in choices}
    runs: dict[tuple[str, str], list[measure.Run]] = {}
    steps: dict[tuple[str, str], list[float]] = {}
    for rep in range(args.reps):
        for choice in choices:
            for system in ("edgetune", "torch"):
                with tempfile.TemporaryDirectory(prefix="bench-ft-") as out:
                    cmd = seed_command(system, choice, tods[choice], args.data, Path(out), args.threads)
                    runs.setdefault((choice, system), []).append(
                        measure.run(cmd, thread_env(args.threads), label=f"{system} {choice} rep {rep + 1}"))
                steps.setdefault((choice, system), []).append(
                    step_ms(system, choice, tods[choice], args.threads, args.step_samples))
                print(f"rep {rep + 1}/{args.reps} {choice} {system}: {runs[(choice, system)][-1].wall:.1f} s, "
                      f"step {steps[(choice, system)][-1]:.1f} ms", file=sys.stderr, flush=True)
    head_wall = median([r.wall for r in runs.get(("head", "edgetune"), [])])
    rows = ["| trainable | system | wall s | first step s | peak RSS MB | val acc | wall / edgetune head | "
            "step ms (batch 32) | step torch / edgetune |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for choice in choices:
        for system in ("edgetune", "torch"):
            rs = runs[(choice, system)]
            wall = median([r.wall for r in rs])
            ms = median(steps[(choice, system)])
            ratio = median(steps[(choice, "torch")]) / median(steps[(choice, "edgetune")])
            title = "edgetune (net_runner)" if system == "edgetune" else "PyTorch eager + its own cache at the cut"
            rows.append(f"| {choice} | {title} | {fmt(wall)} | {fmt(median([r.first_step for r in rs]))} | "
                        f"{fmt(median([r.peak_rss_mb for r in rs]), 0)} | {fmt(median([r.validation for r in rs]), 3)} | "
                        f"{fmt(wall / head_wall if head_wall else None, 2)}x | {fmt(ms)} | "
                        f"{fmt(ratio, 2) + 'x' if system == 'edgetune' else ''} |")
    print(f"{len(choices)} choices x 2 systems x {args.reps} reps, {args.threads} threads, data {args.data}, "
          f"{SEED_STEPS} steps; medians")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
