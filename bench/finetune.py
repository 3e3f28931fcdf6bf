"""edgetune fine-tuning per `--trainable` choice, end to end, next to the linear probe (issue 11).

For each dataset and each choice (`head`, `last-block`, `last-stage` of EfficientNet-Lite0):

1. `edgetune export --trainable CHOICE` (its default recipe: optimizer, rates, parameter groups)
   and `edgetune convert`, once, kept under `--work`;
2. `net_runner -f model.tod -d DATA -c STEPS -q --target-accuracy 1` as a child process: the
   default recipe as a user gets it, trained for all STEPS (the seed's net_runner stops at the
   first test accuracy above 0.9, which would end runs at different points). Reported: validation
   accuracy (its last line), whole-run time and peak RSS (`bench/measure.py`). For `head`, also
   `net_runner --auto` (issue 12: the head's recipe searched on the test split; the seed's SGD is
   the head's stored default);
3. the feature cache's bytes per image (the cut tensor in float32).

Next to them: the linear-probe bound of `bench/probe.py` (a converged L2 logistic regression on
the frozen logits, C chosen on the test split, validation reported). Step times next to PyTorch
at the same cut and thread count, and the whole seed run per choice: `bench/finetune_speed.py`.

    python bench/finetune.py --data /work/data/glyphs300 --data /work/data/fm300 --epochs 30

`--epochs` sets STEPS = epochs x ceil(train images / 32). `--seeds 0,1,2` runs each cell once per
data-order seed and reports the mean (each run's accuracy beside it; time: median, RSS: max).
Accuracy does not depend on machine load; the times do (run on a quiet machine for those).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

CHOICES = ("head", "last-block", "last-stage")
FIRST_BLOCK = {"head": None, "last-block": 15, "last-stage": 11}
BATCH = 32


def build(data: Path, choice: str, work: Path) -> Path:
    """The `.tod` of `choice` for `data`'s classes, exported and converted once (kept under `work`)."""
    tod = work / f"{data.name}-{choice}.tod"
    if tod.exists():
        return tod
    from edgetune.convert import convert
    from edgetune.host import TransferNet, create_backbone, default_head, export
    from edgetune.runtime.dataset import read_class_file

    names = [name for _folder, name in read_class_file(data / "classes.txt")]
    backbone, info = create_backbone("efficientnet-lite0")
    net = TransferNet(backbone, default_head(info.features, len(names), seed=0))
    onnx_path = export(net, choice, class_names=names, batch_size=BATCH, path=work / f"{data.name}-{choice}.onnx")
    return Path(convert(onnx_path, tod))


def run_net_runner(tod: Path, data: Path, steps: int, cache_dir: Path, auto: bool = False, seed: int = 0) -> dict:
    """`net_runner -f tod -d data -c steps -q --seed seed` (or `--auto`) in a child: validation accuracy, wall s,
    peak RSS (MB). The seed sets the data order (and dropout); the initial weights are the model's.

    Measured by `bench/measure.py` (the child under `/usr/bin/time -v`): the peak RSS of a child
    forked from this process would start at this process's own (torch loaded: ~700 MB).
    """
    from bench import measure

    how = ["--auto"] if auto else ["-c", str(steps), "--target-accuracy", "1"]  # the seed stops at test accuracy 0.9
    cmd = [sys.executable, "-m", "edgetune.cli.main", "run", "-f", str(tod), "-d", str(data), "-q",
           "--cache-dir", str(cache_dir), "--seed", str(seed), *how]
    try:
        run = measure.run(cmd, {"PYTHONPATH": str(ROOT)}, label=f"net_runner {tod.name}")
    except RuntimeError as e:
        raise SystemExit(f"net_runner failed on {tod}: {e}") from None
    return {"validation": run.validation, "seconds": run.wall, "rss_mb": run.peak_rss_mb}


def linear_probe(tod: Path, data: Path, cache_dir: Path) -> tuple[float, float]:
    """The probe bound on the frozen logits (`bench/probe.py`): validation accuracy at C=1 and at C chosen on test."""
    from bench.probe import extract_features, probe

    result = probe(extract_features(tod, data, cache_dir))
    return result.default.validation_accuracy, result.chosen.validation_accuracy


ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, action="append", required=True, help="a prepared dataset (repeatable)")
    parser.add_argument("--choices", default=",".join(CHOICES), help="comma-separated (default: all three)")
    parser.add_argument("--epochs", type=float, default=30, help="passes over the train split per run (default 30)")
    parser.add_argument("--steps", type=int, help="training steps per run instead of --epochs (a quick check)")
    parser.add_argument("--work", type=Path, default=Path("bench-finetune"), help="models, caches (default ./bench-finetune)")
    parser.add_argument("--no-probe", action="store_true", help="skip the linear probe")
    parser.add_argument("--seeds", default="0", help="comma-separated data-order seeds, one run each: the table "
                        "gives their mean and each run's accuracy (default 0)")
    args = parser.parse_args(argv)
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds takes comma-separated integers, got {args.seeds!r}")
    if not args.seeds:
        parser.error("--seeds names no seed")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run every (dataset, choice) and print one Markdown table."""
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    choices = [c.strip() for c in args.choices.split(",") if c.strip()]
    unknown = sorted(set(choices) - set(CHOICES))
    if unknown:
        raise SystemExit(f"unknown choices {unknown}; known: {', '.join(CHOICES)}")
    from edgetune.host.trainable import RECIPES
    from edgetune.runtime import format as tod_format
    from edgetune.runtime.dataset import load_dataset, read_class_file

    rows = ["| dataset | trainable | recipe | steps | validation acc (mean of seeds) | probe C=1 / C on test | whole run s | "
            "peak RSS MB | cache bytes/image |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    done, total = 0, len(args.data) * len(choices)
    for data in args.data:
        classes = len(read_class_file(data / "classes.txt"))
        head_meta = tod_format.load_file(build(data, "head", args.work)).meta
        train = len(load_dataset(data, head_meta["preprocessing"], num_classes=classes).train)
        steps = args.steps or max(1, round(args.epochs * math.ceil(train / BATCH)))
        cache = args.work / "cache"
        probe_text = "-"
        if not args.no_probe:
            default, chosen = linear_probe(build(data, "head", args.work), data, cache)
            probe_text = f"{default:.4f} / {chosen:.4f}"
        for choice in choices:
            tod = build(data, choice, args.work)
            meta = tod_format.load_file(tod).meta
            variants = [(RECIPES[choice].describe(), False)] + ([("--auto (issue 12)", True)] if choice == "head" else [])
            for recipe, auto in variants:
                runs = [run_net_runner(tod, data, steps, cache, auto, seed) for seed in args.seeds]
                accuracy = [run["validation"] for run in runs]
                shown = f"{statistics.mean(accuracy):.4f}" + (
                    f" ({' / '.join(f'{a:.4f}' for a in accuracy)})" if len(runs) > 1 else "")
                rows.append(f"| {data.name} | {choice} | {recipe} | {'searched' if auto else steps} | {shown} | "
                            f"{probe_text} | {statistics.median(r['seconds'] for r in runs):.0f} | "
                            f"{max(r['rss_mb'] for r in runs):.0f} | {4 * meta['frozen']['features']} |")
            done += 1
            print(f"{done}/{total} done: {data.name} {choice}: validation {shown}", file=sys.stderr, flush=True)
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
