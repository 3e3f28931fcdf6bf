"""Why `--auto` starts a fresh classifier at zero: the head next to the linear probe at the same C.

Usage: `python bench/zero_start.py --model M.tod --data DIR [--cache-dir D] [--epochs N]`

For every learning rate of the SGD grid (`auto.LR_GRIDS["sgd"]`) and every weight decay of
`auto.DECAY_FACTORS` whose C = 1 / factor lies on the probe's grid, it trains the head twice as an
`--auto` candidate trains (Trainer, cosine over `auto.horizon_for`, seed 0): once from the model's
random start and once with the classifier zeroed (`auto.prepare`). It prints each end-of-horizon
validation accuracy minus the converged logistic regression's at the same C (bench/probe.py), and
the mean of those differences at weak decay (factor <= 30) and strong decay. The head's regularized
optimum is the probe's (up to the bias, which the optimizers decay too), so a gap is the head not
reaching it. Run it on data you do not report on: it is the design evidence, not a result.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from a checkout
sys.path.insert(0, str(ROOT / "bench"))

WEAK = 30.0  # decay factors up to this are "weak": the random start's residue lasts the whole horizon


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table; 0 on success."""
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--model", type=Path, required=True, help="the .tod model (a dense head over the features)")
    p.add_argument("--data", type=Path, required=True, help="prepared dataset folder (classes.txt)")
    p.add_argument("--cache-dir", type=Path, help="keep the feature cache on disk there")
    p.add_argument("--epochs", type=int, default=None, help="cosine horizon in epochs (default: --auto's)")
    args = p.parse_args(argv)

    import probe
    from edgetune.runtime import Context, CosineLR, Trainer, TrainingDiverged, auto
    from edgetune.runtime import format as tod_format
    from edgetune.runtime.dataset import load_dataset

    features = probe.extract_features(args.model, args.data, args.cache_dir)  # in each split's order
    model = tod_format.load_file(args.model)
    data = load_dataset(args.data, model.meta["preprocessing"], num_classes=model.meta["num_classes"])
    splits = {split.name: split for split in (data.train, data.test, data.validation)}
    n = len(splits["train"])
    horizon = auto.horizon_for(n, int(model.meta["batch_size"]), args.epochs or auto.EPOCHS)
    factors = [f for f in auto.DECAY_FACTORS if f > 0 and any(abs(1 / f - c) / c < 0.15 for c in probe.C_GRID)]
    bound = {}
    for f in factors:
        c = min(probe.C_GRID, key=lambda c: abs(1 / f - c))
        fitted, _ = probe.fit(features["train"][0].astype(np.float64), features["train"][1], c)
        bound[f] = float((fitted.predict(features["validation"][0].astype(np.float64)) == features["validation"][1]).mean())

    print(f"validation accuracy minus the probe's at the same C, after {horizon} steps (cosine), seed 0")
    print(f"{'start':<7}{'lr':>7} " + "".join(f"{f'f={f:g}':>9}" for f in factors))
    gaps: dict[tuple[str, bool], list[float]] = {}
    for zero in (False, True):
        start = "zero" if zero else "random"
        for lr in auto.LR_GRIDS["sgd"]:
            row = f"{start:<7}{lr:>7g} "
            for f in factors:
                session = auto.recipe_session(model, lr, f / n, Context(cache=True), zero_classifier=zero)
                for name, split in splits.items():
                    session.feature_cache.put_many(split.keys, features[name][0])
                trainer = Trainer(session, splits["train"], splits["test"], callbacks=[CosineLR(horizon)], seed=0,
                                  test_every=0, target_accuracy=None)
                try:
                    trainer.fit(horizon)
                except TrainingDiverged:
                    row += f"{'diverged':>9}"
                    continue
                gap = 100 * (trainer.evaluate("validation", splits["validation"]) - bound[f])
                gaps.setdefault((start, f <= WEAK), []).append(gap)
                row += f"{gap:>+9.2f}"
            print(row, flush=True)
    for (start, weak), values in sorted(gaps.items()):
        print(f"mean, {start} start, {'weak' if weak else 'strong'} decay (factor {'<=' if weak else '>'} {WEAK:g}): "
              f"{np.mean(values):+.2f} points over {len(values)} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
