"""The linear-probe bound: a converged L2 logistic regression on the frozen features a model's head sees.

Usage: `python bench/probe.py --model M.tod --data DIR [--cache-dir D] [--threads N]`

The features come through edgetune's own session, loader and feature cache (`Trainer.features`), so
they are exactly what training sees, split the loader's way (train / test / validation). scikit-learn's
`LogisticRegression` (multinomial, L2, lbfgs) is fitted on the train split with its default C=1 and
with each C of a small grid; C is chosen on the **test** split (ties: the smaller C, the simpler
model) and validation accuracy is reported for both, as every accuracy claim in this project is.

No standardization: the head is a dense layer on the raw features, and weight decay on its weights is
the same L2 penalty as scikit-learn's on raw features (decay lambda ~ 1 / (C * n_train)). A probe on
standardized features would bound a different model, one the head's training never targets.

Convergence is checked, not assumed: each fit must stop before `max_iter` (10000) by lbfgs' own
tolerance; one that does not is reported as not converged and the script exits 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from edgetune.errors import UserError  # noqa: E402

C_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
DEFAULT_C = 1.0
MAX_ITER = 10_000


@dataclass(frozen=True)
class ProbeRow:
    """One fitted logistic regression: its C, accuracies, and lbfgs' iteration count."""

    C: float
    test_accuracy: float
    validation_accuracy: float
    iterations: int
    converged: bool


@dataclass(frozen=True)
class ProbeResult:
    """The grid's rows, the default-C row and the row chosen on the test split."""

    rows: list[ProbeRow]
    default: ProbeRow
    chosen: ProbeRow


Features = dict[str, tuple[np.ndarray, np.ndarray]]  # split name -> (X (N, F) float32, y (N,) int)


def extract_features(model: str | os.PathLike, data: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                     threads: int = 1) -> Features:
    """Every split's frozen features and labels, through the session, loader and cache training uses.

    Args:
        model: the `.tod` model.
        data: the prepared dataset folder.
        cache_dir: keep the feature cache on disk there (a second run reads it back); None: in memory.
        threads: onnxruntime threads for the backbone.

    Returns:
        `{"train" | "test" | "validation": (features, labels)}`.
    """
    from edgetune.data.progress import Progress
    from edgetune.runtime import Context, Trainer, TrainSession
    from edgetune.runtime.dataset import load_dataset

    session = TrainSession.create(model, Context(threads=threads, cache_dir=cache_dir))
    data = load_dataset(data, session.preprocessing, num_classes=session.num_classes)
    bars: dict[str, Progress] = {}

    def progress(what: str, done: int, total: int) -> None:  # the Trainer's (what, done, total) -> a stderr bar
        bar = bars.setdefault(what, Progress(f"extracting {what}", total))
        bar.update(done - bar.done)
        if done >= total:
            bar.close()

    trainer = Trainer(session, data.train, data.test, progress=progress)
    out = {}
    for split in (data.train, data.test, data.validation):
        if len(split) == 0:
            raise UserError(f"{data}: the {split.name} split is empty (each class needs at least 5 images)")
        out[split.name] = (trainer.features(split), np.asarray(split.labels, dtype=np.int64))
    return out


def fit(x: np.ndarray, y: np.ndarray, C: float, max_iter: int = MAX_ITER):
    """A multinomial L2 logistic regression (lbfgs) on raw features; returns (model, converged).

    Fitted in float64 on one BLAS thread: scikit-learn's float32 path took 40 s where float64 takes
    under 2 s (600 x 1000 features, measured here), and one thread cannot oversubscribe a shared machine.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    model = LogisticRegression(C=C, solver="lbfgs", max_iter=max_iter)
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore", ConvergenceWarning)  # checked below through n_iter_
        model.fit(np.asarray(x, dtype=np.float64), y)
    return model, int(np.max(model.n_iter_)) < max_iter


def probe(features: Features, grid: Sequence[float] = C_GRID, max_iter: int = MAX_ITER) -> ProbeResult:
    """Fit the default C and every C of `grid` on train; choose C on test; report validation.

    Args:
        features: what `extract_features` returns.
        grid: the Cs to choose from (the default C=1 is always fitted too).
        max_iter: lbfgs' iteration limit; a fit that reaches it is marked not converged.

    Returns:
        The rows in ascending C, the default-C row, and the row with the best test accuracy
        (ties: the smaller C).
    """
    if not grid or any(not (c > 0 and np.isfinite(c)) for c in grid):
        raise UserError(f"every C must be a finite number > 0, got {list(grid)}")
    (xtr, ytr), (xte, yte), (xva, yva) = features["train"], features["test"], features["validation"]
    rows = []
    for c in sorted(set(grid) | {DEFAULT_C}):
        model, converged = fit(xtr, ytr, c, max_iter)
        rows.append(ProbeRow(c, accuracy(model, xte, yte), accuracy(model, xva, yva),
                             int(np.max(model.n_iter_)), converged))
    default = next(r for r in rows if r.C == DEFAULT_C)
    in_grid = [r for r in rows if r.C in set(grid)]
    chosen = max(in_grid, key=lambda r: (r.test_accuracy, -r.C))
    return ProbeResult(rows, default, chosen)


def accuracy(model, x: np.ndarray, y: np.ndarray) -> float:
    """Fraction of `x` whose predicted class is `y`."""
    return float((model.predict(np.asarray(x, dtype=np.float64)) == y).mean())


def format_table(result: ProbeResult) -> str:
    """The grid and the two summary rows as a Markdown table."""
    lines = ["| C | test acc | validation acc | lbfgs iterations |", "|---:|---:|---:|---:|"]
    for r in result.rows:
        note = "" if r.converged else " NOT CONVERGED"
        lines.append(f"| {r.C:g} | {r.test_accuracy:.4f} | {r.validation_accuracy:.4f} | {r.iterations}{note} |")
    lines += ["", "| probe | C | validation acc |", "|---|---:|---:|",
              f"| scikit-learn default | {result.default.C:g} | {result.default.validation_accuracy:.4f} |",
              f"| C chosen on test | {result.chosen.C:g} | {result.chosen.validation_accuracy:.4f} |"]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line: --model, --data, --cache-dir, --threads."""
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--model", type=Path, required=True, help="the .tod model whose frozen features are probed")
    p.add_argument("--data", type=Path, required=True, help="prepared dataset folder (classes.txt)")
    p.add_argument("--cache-dir", type=Path, help="keep the feature cache on disk here (reused across runs)")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime threads for the backbone (default 1)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Extract, fit and print the table; 0, 1 if a fit did not converge, 2 on a user mistake."""
    args = parse_args(argv)
    try:
        start = time.perf_counter()
        features = extract_features(args.model, args.data, args.cache_dir, args.threads)
        extracted = time.perf_counter() - start
        result = probe(features)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sizes = " / ".join(f"{name} {len(y)}" for name, (_, y) in features.items())
    width = features["train"][0].shape[1]
    print(f"linear probe of {args.model} on {args.data}: {width} features, {sizes} "
          f"(extracted in {extracted:.1f} s, fitted in {time.perf_counter() - start - extracted:.1f} s)")
    print(format_table(result))
    return 0 if all(r.converged for r in result.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
