"""Issue 12's table: the plain demo recipe and the --auto recipe next to the linear-probe bound.

Usage: `python bench/recipe.py --model M.tod --data DIR [--cache-dir D] [--budget S] [--seed N]`

For one model and prepared dataset it measures the validation accuracy of
1. the linear probe (bench/probe.py): L2 logistic regression at scikit-learn's default C=1, and
   with C chosen on the test split;
2. the plain recipe, the demo's train.sh: `net_runner -c 600 --lr 0.01 --target-accuracy 1.01`;
3. the --auto recipe: `edgetune.runtime.auto.search` on the test split, then the chosen recipe
   trained from the model file through the Trainer (cosine over the chosen step count, from a zero
   classifier), as `net_runner --auto` runs it.
Runs 2 and `net_runner --auto` are separate processes, timed from start to exit; each extracts the
features itself unless `--cache-dir` lets them share a disk cache (then their times say nothing about
speed). Without it, on the demo data, the two wall times are issue 12's "at most 2x the plain run"
check. A third process repeats the --auto run through the API for the search's details (its
validation accuracy equals net_runner's: same seed, same batches).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from a checkout
sys.path.insert(0, str(ROOT / "bench"))

PLAIN = ["-c", "600", "--lr", "0.01", "--target-accuracy", "1.01"]  # the demo's train.sh


def run_auto(model: str, data: str, seed: int, budget: float, cache_dir: str | None) -> dict:
    """Search, then train the chosen recipe from the model file and measure validation; returns the numbers."""
    from edgetune.runtime import Context, CosineLR, Trainer, TrainSession, auto
    from edgetune.runtime import format as tod_format
    from edgetune.runtime.dataset import load_dataset

    tod = tod_format.load_file(model)
    session = TrainSession.create(model, Context(cache_dir=cache_dir))
    data = load_dataset(data, session.preprocessing, num_classes=session.num_classes)
    extractor = Trainer(session, data.train, data.test, seed=seed, target_accuracy=None)
    rows = {split.name: extractor.features(split) for split in (data.train, data.test, data.validation)}
    extracted = time.perf_counter()
    result = auto.search(session, data.train, data.test, model=tod, seed=seed, budget=budget)
    print(result.table(), file=sys.stderr)
    searched = time.perf_counter()
    r = result.recipe
    final = auto.recipe_session(tod, r.lr, r.weight_decay, Context(), zero_classifier=r.zero_classifier)
    for split in (data.train, data.test, data.validation):  # the backbone already ran for these images
        final.feature_cache.put_many(split.keys, rows[split.name])
    trainer = Trainer(final, data.train, data.test, callbacks=[CosineLR(r.steps)], seed=seed,
                      test_every=0, target_accuracy=None)
    trainer.fit(r.steps)
    test, validation = trainer.evaluate("test"), trainer.evaluate("validation", data.validation)
    with tempfile.TemporaryDirectory() as tmp:  # net_runner saves the trained model: so does this run
        final.save(os.path.join(tmp, "trained.tod"))
    return {"recipe": {"lr": r.lr, "weight_decay": r.weight_decay, "steps": r.steps,
                       "zero_classifier": r.zero_classifier},
            "search_test_accuracy": r.test_accuracy, "retrained_test_accuracy": test,
            "validation_accuracy": validation, "search_seconds": searched - extracted,
            "budget_spent": result.budget_spent, "trials": result.rows()}


def timed(cmd: list[str]) -> tuple[float, str]:
    """Run a command to completion; its wall time and stdout (stderr passes through)."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    return seconds, proc.stdout


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--model", type=Path, required=True, help="the .tod model (its class count fits the data)")
    p.add_argument("--data", type=Path, required=True, help="prepared dataset folder (classes.txt)")
    p.add_argument("--cache-dir", type=Path, help="share a disk feature cache between the runs (accuracy only)")
    p.add_argument("--budget", type=float, default=None, help="--auto's budget in seconds (default: the library's)")
    p.add_argument("--seed", type=int, default=0, help="seed of both recipes (default 0)")
    p.add_argument("--json", type=Path, help="also write the numbers here")
    p.add_argument("--run", choices=["auto"], help=argparse.SUPPRESS)  # the child process of step 3
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Measure and print one table row; 0 on success."""
    args = parse_args(argv)
    from edgetune.runtime import auto

    budget = auto.DEFAULT_BUDGET if args.budget is None else args.budget
    cache = None if args.cache_dir is None else str(args.cache_dir)
    if args.run == "auto":
        print(json.dumps(run_auto(str(args.model), str(args.data), args.seed, budget, cache)))
        return 0
    import probe

    features = probe.extract_features(args.model, args.data, args.cache_dir)
    bound = probe.probe(features)
    print(probe.format_table(bound), file=sys.stderr)
    common = ["--model", str(args.model), "--data", str(args.data), "--seed", str(args.seed)]
    cache_args = [] if cache is None else ["--cache-dir", cache]
    plain_s, out = timed([sys.executable, "-m", "edgetune.cli.net_runner", "-f", str(args.model), "-d", str(args.data),
                          *PLAIN, "--seed", str(args.seed), "-q", *cache_args])
    plain_val = float(re.findall(r"accuracy on validation data = ([0-9.e-]+)", out)[-1])
    auto_s, out = timed([sys.executable, "-m", "edgetune.cli.net_runner", "-f", str(args.model), "-d", str(args.data),
                         "--auto", "--auto-budget", str(budget), "--seed", str(args.seed), "-q", *cache_args])
    auto_cli_val = float(re.findall(r"accuracy on validation data = ([0-9.e-]+)", out)[-1])
    _, out = timed([sys.executable, __file__, "--run", "auto", *common, "--budget", str(budget), *cache_args])
    found = json.loads(out.strip().splitlines()[-1])
    sizes = {name: len(y) for name, (_, y) in features.items()}
    result = {"model": str(args.model), "data": str(args.data), "sizes": sizes,
              "probe_c1": bound.default.validation_accuracy, "probe_chosen_c": bound.chosen.C,
              "probe_chosen": bound.chosen.validation_accuracy, "plain": plain_val, "plain_seconds": plain_s,
              "auto": found["validation_accuracy"], "auto_net_runner": auto_cli_val, "auto_seconds": auto_s,
              "auto_detail": found}
    r = found["recipe"]
    print("| dataset | train/test/val | probe C=1 | probe C on test | plain 600 steps | --auto | auto recipe |")
    print("|---|---|---:|---:|---:|---:|---|")
    print(f"| {args.data.name} | {sizes['train']}/{sizes['test']}/{sizes['validation']} | {result['probe_c1']:.4f} "
          f"| {result['probe_chosen']:.4f} (C={bound.chosen.C:g}) | {plain_val:.4f} | {result['auto']:.4f} "
          f"| lr {r['lr']:g}, decay {r['weight_decay']:.3g}, {r['steps']} steps |")
    print(f"wall: net_runner plain {plain_s:.1f} s, net_runner --auto {auto_s:.1f} s ({auto_s / plain_s:.2f}x; "
          f"search {found['search_seconds']:.1f} s{', budget spent' if found['budget_spent'] else ''}); "
          f"net_runner --auto validation {auto_cli_val:.4f}; retrained test {found['retrained_test_accuracy']:.4f}"
          f" vs searched {found['search_test_accuracy']:.4f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
