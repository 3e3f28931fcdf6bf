"""Accuracy of int8 frozen parts against the fp32 one, on the same prepared dataset and the same recipes.

    .venv/bin/python bench/quant_accuracy.py --fp32 lite0.tod --int8 lite0_int8.tod [more_int8.tod ...] \\
        --data /work/data/fm300 [--seeds 0,1,2,3] [--threads 2]

For every model it reports, on the dataset's validation split:

- **probe**: a linear classifier trained to convergence on the model's frozen features (multinomial
  logistic regression, L-BFGS, features standardized on the train split; the L2 weight is chosen
  on the test split from a grid, the validation accuracy is reported), i.e. what the features allow;
  its gap to fp32 comes with a paired standard error, and the gap at every L2 of the grid is shown;
- **net_runner**: the demo's training recipe (``-c 600 --lr 0.01 --target-accuracy 1.01``) at each
  seed, validation accuracy mean and spread: what a user gets;
- **fidelity** of each int8 model's features to the fp32 ones on the validation images: per-image
  cosine similarity (min, mean), relative error ``|q - f| / |f|`` (mean, max), and top-1 agreement
  of the features (for Lite0 they are the 1000 ImageNet logits).

Features are computed once per model by edgetune's runtime into its disk feature cache in
``--work`` (keyed by the frozen graph's SHA-256), which the net_runner runs then reuse.
Accuracy numbers do not depend on the machine's load; nothing here is timed.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
from scipy.optimize import minimize

import common
import results
import run
from edgetune.runtime import Context, TrainSession
from edgetune.runtime.trainer import Trainer

BENCH = Path(__file__).resolve().parent
RECIPE = ("-c", "600", "--lr", "0.01", "--target-accuracy", "1.01")
L2_GRID = (3e-1, 1e-1, 3e-2, 1e-2, 3e-3)  # strongest first: each fit starts from the previous one
VALIDATION = re.compile(r"^accuracy on validation data = (\S+)", re.M)
SPLITS = ("train", "test", "validation")


def features(model: Path, data: Path, threads: int, work: Path) -> dict[str, np.ndarray]:
    """The frozen features of every split, through edgetune's own disk feature cache in ``work/cache``.

    net_runner is pointed at the same cache, so each image goes through each backbone once; a
    summary ``.npz`` per frozen graph and dataset makes a second run of this script instant.
    """
    meta, _, frozen = common.load_model_meta(model)
    path = work / f"features-{hashlib.sha256(frozen).hexdigest()[:16]}-{data.name}.npz"
    if path.exists():
        return dict(np.load(path))
    session = TrainSession.create(model, Context(threads=threads, cache_dir=work / "cache"))
    out = {}
    for split in common.load_splits(data, meta):
        trainer = Trainer(session, split, progress=lambda what, done, total, name=model.name: print(
            f"\r{name} {what}: {done}/{total}", end="", file=sys.stderr, flush=True))
        out[split.name] = trainer.features(split)
        out[f"{split.name}_labels"] = split.labels
    print(file=sys.stderr)
    np.savez(path, **out)
    return out


class ProbeRow(NamedTuple):
    """The converged logistic regression at one l2: accuracies, and which validation images it got right."""

    l2: float
    test: float
    validation: float
    right: np.ndarray  # bool per validation image


def probe(f: dict[str, np.ndarray]) -> tuple[float, float, float]:
    """Converged L2 logistic regression: ``(l2, test accuracy, validation accuracy)`` at the l2 best on test."""
    return best_on_test(probe_grid(f))[:3]


def best_on_test(grid: list[ProbeRow]) -> ProbeRow:
    """The grid's row with the best test accuracy (the first, strongest L2, of equals)."""
    return max(grid, key=lambda row: row.test)


def paired_gap(right: np.ndarray, base: np.ndarray) -> tuple[float, float]:
    """``(gap, standard error)`` in points of two classifiers' accuracy on the same images.

    Only the images one gets right and the other wrong carry the difference, so its standard error
    is that of the per-image difference (-1, 0 or 1), not of either accuracy: what says whether a
    gap is more than the choice of validation images.
    """
    d = right.astype(np.float64) - base.astype(np.float64)
    return 100 * float(d.mean()), 100 * float(d.std(ddof=1) / np.sqrt(len(d)))


def probe_grid(f: dict[str, np.ndarray]) -> list[ProbeRow]:
    """The converged logistic regression at each l2 of the grid.

    Two feature sets compared at the same l2 differ by their features alone; compared at each one's
    own best l2, also by which l2 won on the test split (a few test images can flip that).
    """
    mean, std = f["train"].mean(0), f["train"].std(0) + 1e-6
    x = {s: ((f[s] - mean) / std).astype(np.float64) for s in SPLITS}
    y = {s: f[f"{s}_labels"] for s in SPLITS}
    n, d = x["train"].shape
    k = int(max(y["train"].max(), y["test"].max(), y["validation"].max())) + 1
    onehot = np.eye(k)[y["train"]]
    w0, rows = np.zeros(d * k + k), []
    for l2 in L2_GRID:
        def loss_grad(w: np.ndarray, l2: float = l2) -> tuple[float, np.ndarray]:
            weight, bias = w[:d * k].reshape(d, k), w[d * k:]
            z = x["train"] @ weight + bias
            z -= z.max(1, keepdims=True)
            p = np.exp(z)
            p /= p.sum(1, keepdims=True)
            loss = -np.mean(np.log(p[np.arange(n), y["train"]] + 1e-300)) + 0.5 * l2 * np.sum(weight * weight)
            g = (p - onehot) / n
            return loss, np.concatenate([(x["train"].T @ g + l2 * weight).ravel(), g.sum(0)])

        w0 = minimize(loss_grad, w0, jac=True, method="L-BFGS-B", options={"maxiter": 5000, "gtol": 1e-6}).x
        weight, bias = w0[:d * k].reshape(d, k), w0[d * k:]
        right = {s: (x[s] @ weight + bias).argmax(1) == y[s] for s in ("test", "validation")}
        rows.append(ProbeRow(l2, float(right["test"].mean()), float(right["validation"].mean()), right["validation"]))
    return rows


def fidelity(fp32: np.ndarray, q: np.ndarray) -> dict[str, float]:
    """Per-image agreement of quantized features ``q`` with the fp32 ones (rows are images)."""
    cos = np.sum(fp32 * q, 1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(q, axis=1)
    rel = np.linalg.norm(q - fp32, axis=1) / np.linalg.norm(fp32, axis=1)
    return {"cos_min": float(cos.min()), "cos_mean": float(cos.mean()), "rel_mean": float(rel.mean()),
            "rel_max": float(rel.max()), "top1": float(np.mean(q.argmax(1) == fp32.argmax(1)))}


def net_runner(model: Path, data: Path, seed: int, threads: int, work: Path) -> float:
    """Validation accuracy after the demo's recipe at ``seed`` (the model copied: checkpoints land next to it)."""
    with tempfile.TemporaryDirectory(prefix="quant-acc-") as tmp:
        copy = Path(tmp) / model.name
        shutil.copyfile(model, copy)
        runner = str(Path(sys.executable).parent / "net_runner")
        done = subprocess.run([runner, "-f", str(copy), "-d", str(data), *RECIPE, "--seed", str(seed), "-q",
                               "--threads", str(threads), "--cache-dir", str(work / "cache")],
                              capture_output=True, text=True, check=True)
    return float(VALIDATION.findall(done.stdout)[-1])


def main() -> None:
    """Measure every model, print one markdown table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fp32", type=Path, required=True, help="the fp32 .tod")
    p.add_argument("--int8", type=Path, nargs="+", required=True, help="int8 .tod files of the same model")
    p.add_argument("--data", type=Path, required=True, help="a prepared dataset (e.g. 300 images per class)")
    p.add_argument("--seeds", default="0,1,2,3", help="net_runner seeds (default 0,1,2,3; '' for none)")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime threads (default 2)")
    p.add_argument("--work", type=Path, default=BENCH / ".work" / "quant", help="features and caches")
    p.add_argument("--results", type=Path, help="also write the table as a section of this file (bench/RESULTS.md)")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    base = features(args.fp32, args.data, args.threads, args.work)
    rows = ["| model | calibration | probe val (test) | probe val - fp32 (paired SE) | probe - fp32 at each fixed L2: val min / "
            "mean / max (test mean) | net_runner val, mean [min, max] "
            "| net_runner val - fp32, paired by seed: mean [min, max] | cos min / mean | rel err mean / max "
            "| top-1 agreement |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    fp32_best, fp32_grid, fp32_runs = None, [], []
    goals = ["Goal (issue 13): validation accuracy within 1 point of fp32 with the same recipe (net_runner's "
             "mean gap, paired by seed); the probe's gap beside it, with its paired standard error:"]
    for model in [args.fp32, *args.int8]:
        f = base if model == args.fp32 else features(model, args.data, args.threads, args.work)
        grid = probe_grid(f)
        best = best_on_test(grid)
        l2, test, val = best[:3]
        runs = [net_runner(model, args.data, s, args.threads, args.work) for s in seeds]
        if model == args.fp32:
            fp32_best, fp32_grid, fp32_runs = best, grid, runs
        at_l2 = [(100 * (r.validation - fr.validation), 100 * (r.test - fr.test)) for r, fr in zip(grid, fp32_grid)]
        fixed = "—" if model == args.fp32 else (
            f"{min(g for g, _ in at_l2):+.2f} / {statistics.mean(g for g, _ in at_l2):+.2f} / "
            f"{max(g for g, _ in at_l2):+.2f} ({statistics.mean(t for _, t in at_l2):+.2f})")
        deltas = [100 * (a - b) for a, b in zip(runs, fp32_runs)]
        recipe = f"{statistics.mean(runs):.4f} [{min(runs):.3f}, {max(runs):.3f}]" if runs else "—"
        paired = (f"{statistics.mean(deltas):+.2f} [{min(deltas):+.2f}, {max(deltas):+.2f}] points"
                  if deltas and model != args.fp32 else "—")
        meta = common.load_model_meta(model)[0]
        q = meta["frozen"].get("quantization")
        calibration = "fp32" if q is None else (
            f"{q['calibration']['method']} {q['calibration'].get('percentile', '')} "
            f"{q['calibration']['images']} images, reduce_range {q['reduce_range']}, "
            f"{len(q['nodes_excluded'])} nodes fp32").replace("  ", " ")
        fid = fidelity(base["validation"], f["validation"])
        probe_gap, probe_se = paired_gap(best.right, fp32_best.right)
        gap = "—" if model == args.fp32 else f"{probe_gap:+.2f} points (±{probe_se:.2f})"
        rows.append(f"| {model.name} | {calibration} | {val:.4f} ({test:.4f}, l2 {l2:g}) | {gap} | {fixed} | {recipe} "
                    f"| {paired} | {fid['cos_min']:.3f} / {fid['cos_mean']:.3f} "
                    f"| {fid['rel_mean']:.3f} / {fid['rel_max']:.3f} | {fid['top1']:.3f} |")
        print(rows[-1], file=sys.stderr, flush=True)
        if model != args.fp32:
            probe_text = f"probe {probe_gap:+.2f} ± {probe_se:.2f} points"
            if deltas:
                verdict = "MET" if statistics.mean(deltas) >= -1.0 else "MISSED"
                goals.append(f"- {model.name}: {verdict} (net_runner {statistics.mean(deltas):+.2f} points; {probe_text})")
            else:
                goals.append(f"- {model.name}: net_runner not run ({probe_text})")
    command = shlex.join(["bench/quant_accuracy.py", *sys.argv[1:]])
    text = (f"## int8 frozen part: validation accuracy against fp32 (issue 13)\n\n"
            f"Command (accuracy does not depend on load; about 8 minutes per model on 2 busy cores): "
            f"`.venv/bin/python {command}`\n\n"
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; CPU: {run.cpu_model()}. Dataset "
            f"{args.data.name} (train {len(base['train'])}, test {len(base['test'])}, validation "
            f"{len(base['validation'])} images). probe: L-BFGS logistic regression to convergence on the "
            f"frozen features, L2 chosen on test, validation reported, its gap to fp32 with the paired standard "
            f"error (from the images exactly one of the two gets right); beside it the gap at each L2 of "
            f"{', '.join(f'{v:g}' for v in L2_GRID)}, paired. net_runner: the demo's recipe "
            f"`{' '.join(RECIPE)}` at seeds {seeds}, the same seeds for every model (same batches). Fidelity "
            f"of the int8 features (Lite0's 1000 logits) to fp32 on the validation images.\n\n"
            + "\n".join(rows) + "\n\n" + "\n".join(goals) + "\n")
    print(text)
    if args.results:
        results.write_section(args.results, "int8-accuracy", text)

if __name__ == "__main__":
    main()
