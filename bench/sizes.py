"""The device's two budgets: install size of the device bundle (<= 160 MB) and a run's peak RSS (<= 250 MB).

``python bench/sizes.py`` measures both and prints a table with MET / MISSED:

- install: what ``pip install edgetune[device]`` puts into site-packages, i.e. the files of every
  distribution the ``device`` extra requires (read from edgetune's own metadata, markers evaluated,
  followed transitively) plus edgetune's package as its wheel holds it. The device bundle that
  ``edgetune prepare-and-run`` builds installs exactly this set from its wheels.
- peak RSS: ``net_runner``'s seed run (60 steps, test accuracy and a checkpoint every 20) on the
  benchmark's demo set, for the fp32 and the int8 model, under ``/usr/bin/time -v``.

``python bench/sizes.py --json numpy onnxruntime`` prints ``{"total": MB, "packages": {...}}`` for
the closure of the given distributions in the running venv (``bench/run.py`` measures every
system's install with it, each in the venv it runs in).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
INSTALL_LIMIT_MB = 160
RSS_LIMIT_MB = 250


def closure(roots: list[str], extra: str = "") -> list[metadata.Distribution]:
    """Return the installed distributions ``roots`` need, themselves included.

    ``extra`` is the extra asked of the roots (e.g. ``device`` of edgetune); the extras of what they
    require are not followed, as pip does not install them either.
    """
    seen: dict[str, metadata.Distribution] = {}
    todo = [(name, extra) for name in roots]
    while todo:
        name, wanted = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        dist = metadata.distribution(name)
        seen[key] = dist
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": wanted}):
                todo.append((req.name, ""))
    return list(seen.values())


def size_mb(dist: metadata.Distribution) -> float:
    """Sum of the sizes of the files a distribution installed, in MB (10^6 bytes)."""
    total = 0
    for f in dist.files or []:
        path = dist.locate_file(f)
        if os.path.isfile(path):
            total += os.path.getsize(path)
    return total / 1e6


def device_install_mb() -> tuple[float, dict[str, float]]:
    """Install size of edgetune[device]: its requirements' files plus edgetune's own package files.

    The venv's edgetune is an editable install (its RECORD lists no package files), so edgetune's
    share is counted from the source tree as its wheel would hold it.
    """
    sizes = {d.metadata["Name"]: round(size_mb(d), 1) for d in closure(["edgetune"], extra="device")
             if d.metadata["Name"] != "edgetune"}
    sizes["edgetune"] = round(sum(p.stat().st_size for p in (REPO / "edgetune").rglob("*.py")) / 1e6, 1)
    return sum(sizes.values()), sizes


def peak_rss_mb(model: Path, data: Path, threads: int) -> float:
    """Peak RSS of net_runner's seed run on ``model`` and ``data`` (a copy of the model: checkpoints land there)."""
    import measure

    with tempfile.TemporaryDirectory(prefix="bench-rss-") as tmp:
        copy = Path(tmp) / model.name
        shutil.copyfile(model, copy)
        runner = str(Path(sys.executable).parent / "net_runner")
        run = measure.run([runner, "-f", str(copy), "-d", str(data), "-c", "60", "-s", "20", "--threads",
                           str(threads), "--target-accuracy", "1.01", "--seed", "0"], label=model.name)
    return run.peak_rss_mb


def main() -> None:
    """Print the closure's sizes as JSON (``--json``), or the device budgets table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", nargs="+", metavar="DIST", help="print the install size of these distributions")
    p.add_argument("--work", type=Path, default=BENCH / ".work", help="the benchmark's prepared inputs")
    p.add_argument("--threads", type=int, default=2, help="net_runner threads (default 2)")
    args = p.parse_args()
    if args.json:
        sizes = {d.metadata["Name"]: round(size_mb(d), 1) for d in closure(args.json)}
        print(json.dumps({"total": round(sum(sizes.values()), 1), "packages": sizes}))
        return
    import prepare

    total, parts = device_install_mb()
    work = prepare.prepare(args.work, args.work / "no-ort-training-venv")
    rows = [("device install (edgetune[device])", total, INSTALL_LIMIT_MB,
             ", ".join(f"{k} {v:.1f}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1])))]
    for label, model in (("peak RSS, seed run, fp32", work.model), ("peak RSS, seed run, int8", work.model_int8)):
        rows.append((label, peak_rss_mb(model, work.data, args.threads), RSS_LIMIT_MB, f"{args.threads} threads"))
    print("| budget | MB | limit MB | | detail |\n|---|---:|---:|---|---|")
    for name, value, limit, detail in rows:
        print(f"| {name} | {value:.1f} | {limit} | {'MET' if value <= limit else 'MISSED'} | {detail} |")


if __name__ == "__main__":
    main()
