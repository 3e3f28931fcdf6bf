"""`net_runner` (also `edgetune run`): train and evaluate a `.tod` model, as the seed's net_runner.

`net_runner -f <model.tod> -d <data_dir> [-c <cycles>] [-v] [-s <save every X>]`. Each step prints
`i: Loss is X [min=Y]`; every 20 steps `accuracy on test data = A max accuracy = M`, stopping
once A > 0.9; at the end `accuracy on validation data = V` and, when cycles > 0, the model is
saved as `<model>_trained.tod`. `-c 0` only evaluates. Numbers print as C++ iostream does (%g).
Device side: numpy, onnxruntime and tqdm (Pillow only for images that are not prepared BMPs,
matplotlib only for `--plot`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from edgetune.cli.errors import run_guarded
from edgetune.data.progress import Progress
from edgetune.errors import UserError
from edgetune.runtime.callbacks import Callback, make_schedule
from edgetune.runtime.frozen import DEFAULT_CACHE_BUDGET
from edgetune.runtime.meta import SCHEDULES, check_mixup


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The seed's getopt options (`-e` is what its sources really parse for cycles) and ours."""
    parser.add_argument("-f", "--model", type=Path, required=True, help="the .tod model (or a checkpoint)")
    parser.add_argument("-d", "--data", type=Path, required=True, help="prepared dataset folder (classes.txt)")
    parser.add_argument("-c", "-e", "--cycles", type=int, default=100,
                        help="training steps (default 100); 0 only evaluates on the validation split")
    parser.add_argument("-v", "--verbose", action="store_true", help="print the output tensors after each step")
    parser.add_argument("-s", "--save-every", type=int, default=0, metavar="X",
                        help="save <model>_trained_<i>.tod every X steps (0: never)")
    parser.add_argument("--test-every", type=int, default=20, help="test accuracy every N steps (default 20)")
    parser.add_argument("--target-accuracy", type=float, default=0.9,
                        help="stop once the test accuracy exceeds this (default 0.9)")
    parser.add_argument("--lr", type=float, help="learning rate, the base a schedule scales (default: the model's; "
                                                 "after a schedule, --schedule constant trains at its base rate)")
    parser.add_argument("--weight-decay", type=float, metavar="WD",
                        help="weight decay, PyTorch's semantics for the model's optimizer (default: the model's)")
    parser.add_argument("--schedule", choices=SCHEDULES,
                        help="learning-rate schedule over this run: constant, cosine to 0, or step (x0.1 at each "
                             "third); default: the model's recipe (the seed's head: constant)")
    parser.add_argument("--warmup", type=int, default=0, metavar="N",
                        help="raise the learning rate linearly over the first N steps (default 0)")
    parser.add_argument("--mixup", type=float, metavar="ALPHA",
                        help="train on mixes of two images' cached features and labels, mixup of this strength "
                             "(0 = off); default: the model's recipe (last-block's: 0.2; the seed's head: off)")
    parser.add_argument("--auto", action="store_true",
                        help="choose learning rate, weight decay and step count on the test split by training "
                             "candidates over the cached features to the end of a cosine, then train the chosen "
                             "recipe (a fresh model's classifier starts at zero; replaces -c, --lr, --weight-decay, "
                             "--schedule and --target-accuracy); prints the search")
    parser.add_argument("--auto-budget", type=float, default=None, metavar="SECONDS",
                        help="--auto: no new candidate starts after this many seconds (default 60)")
    parser.add_argument("--keep-best", action="store_true",
                        help="keep the weights of the step with the best test accuracy (ties: the earlier), "
                             "not the last step's; the log says which step")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data order and dropout (default 0)")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="threads for the backbone (onnxruntime), numpy's matrix products and the training "
                             "step's passes (default: the cores this process may use, here %(default_cores)s; "
                             "1 = the seed's behaviour)" % {"default_cores": _cores()})
    parser.add_argument("--no-cache", action="store_true", help="run the backbone for every batch (no feature cache)")
    parser.add_argument("--cache-dir", type=Path, help="keep the feature cache on disk here (reused across runs)")
    parser.add_argument("--cache-budget", type=float, metavar="MB", default=DEFAULT_CACHE_BUDGET / (1 << 20),
                        help="without --cache-dir: MiB of features held in memory; past it the cache moves to "
                             "files in a temporary folder (default %(default)g; 0 = at once)")
    parser.add_argument("--log", type=Path, help="write one JSON line per step and per evaluation")
    parser.add_argument("--plot", type=Path, help="save loss and accuracy curves (PNG; needs matplotlib)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no per-step lines and no progress bar")


def _cores() -> int:
    from edgetune.runtime.bounds import available_cores

    return available_cores()


def main(argv: Sequence[str] | None = None) -> int:
    """The `net_runner` console script."""
    parser = argparse.ArgumentParser(prog="net_runner", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run_guarded(lambda: run(args), prog="net_runner")


def run(args: argparse.Namespace) -> int:
    """Load the model and dataset, train for `args.cycles` steps, evaluate, save; returns 0."""
    from edgetune.runtime import Context, TrainSession, blas
    from edgetune.runtime.dataset import load_dataset
    from edgetune.runtime.trainer import Trainer

    _check_args(args)
    threads = {} if args.threads is None else {"threads": args.threads}
    if args.threads is not None:  # OPENBLAS_NUM_THREADS was read when numpy loaded: too late for a flag
        blas.set_threads(args.threads)
    session = TrainSession.create(args.model, Context(**threads, cache=not args.no_cache, cache_dir=args.cache_dir,
                                                      cache_budget=int(args.cache_budget * (1 << 20))))
    data = load_dataset(args.data, session.preprocessing, num_classes=session.num_classes)
    for split in (data.validation, *((data.train, data.test) if args.cycles > 0 else ())):
        if len(split) == 0:
            raise UserError(f"{args.data}: the {split.name} split is empty (each class needs at least 5 images)")
    if args.weight_decay is not None:
        session.weight_decay = args.weight_decay
    if args.verbose:
        print(f"data size: {_sample_bytes(session)}\nbatch size: {session.batch_size}", flush=True)
    history = History()
    callbacks = _callbacks(args, history)
    name = session.schedule if args.schedule is None else args.schedule
    scheduled = args.cycles > 0 and not args.auto  # --auto sets its own rate and schedule
    if args.lr is not None or (name == "constant" and scheduled):
        session.restart_learning_rate(args.lr)  # --lr is the base of any schedule; constant after a cosine: its base
    schedule = make_schedule(name, session.step + args.cycles, args.warmup) if scheduled else None
    if schedule is not None:
        callbacks.insert(0, schedule)  # the rate is set before anything reads it
    trainer = Trainer(session, data.train, data.test, callbacks=callbacks, seed=args.seed,
                      test_every=args.test_every, target_accuracy=args.target_accuracy,
                      save_every=args.save_every,  # <model>_trained_<i>.tod next to the model
                      keep_best=args.keep_best, mixup=args.mixup)
    progress = None if args.quiet else FeatureProgress()
    if session.ctx.cache:  # extract each split once up front, with a progress bar; then all is cached
        trainer.progress = progress
        for split, indices in _images_used(trainer, data, 10**9 if args.auto else args.cycles):
            trainer.fill_cache(split, indices)
        trainer.progress = None
        session.frozen.unload()  # all cached: training needs the memory more than onnxruntime does
    else:  # every evaluation runs the backbone again: show each one's progress
        trainer.progress = progress
    cycles = _auto(args, session, data, trainer) if args.auto else args.cycles
    if cycles > 0:
        trainer.fit(cycles)
    accuracy = trainer.evaluate("validation", data.validation)
    print(f"accuracy on validation data = {accuracy:g}", flush=True)
    if cycles > 0:
        session.save(os.fspath(args.model)[: -len(".tod")] + "_trained.tod")
    if args.plot is not None:
        save_plot(history.records, args.plot)
    return 0


def _auto(args: argparse.Namespace, session, data, trainer) -> int:
    """`--auto`: search a recipe on the test split (edgetune.runtime.auto), print and log it, and set the
    session and trainer to train it exactly as the search measured it; returns the step count."""
    from edgetune.runtime import auto
    from edgetune.runtime import format as tod_format
    from edgetune.runtime.callbacks import CosineLR

    progress = None if args.quiet else FeatureProgress(what="searching", unit="candidate")
    result = auto.search(session, data.train, data.test, model=tod_format.load_file(args.model), seed=args.seed,
                         budget=auto.DEFAULT_BUDGET if args.auto_budget is None else args.auto_budget,
                         progress=progress)
    print(result.table(), flush=True)
    if args.log is not None:
        with open(args.log, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in result.rows())
    recipe = result.recipe
    auto.prepare(session, recipe.lr, recipe.weight_decay, recipe.zero_classifier)
    trainer.callbacks.insert(0, CosineLR(recipe.steps, start=session.step))  # as each candidate trained
    trainer.target_accuracy = None  # the chosen step count is the stop
    return recipe.steps


def _callbacks(args: argparse.Namespace, history: History) -> list[Callback]:
    """The seed's output (loss and test-accuracy lines) plus what the options ask for."""
    from edgetune.runtime import callbacks as cb

    chosen: list[Callback] = [history]
    if not args.quiet:
        chosen.append(cb.LossMonitor())
    if args.verbose:
        chosen.append(TensorPrinter())
    chosen.append(cb.AccuracyMonitor())
    if args.log is not None:
        chosen.append(cb.JsonlLogger(args.log))
    return chosen


def _images_used(trainer, data, cycles: int) -> list:
    """(split, indices or None for all) this run reads: the train images its steps will draw, the
    test split when training reaches an evaluation, the validation split always."""
    used = [(data.train, trainer.upcoming(cycles))] if cycles > 0 else []
    if cycles >= trainer.test_every:
        used.append((data.test, None))
    return [*used, (data.validation, None)]


def _check_args(args: argparse.Namespace) -> None:
    """User mistakes that need no model loaded: one clear line each."""
    if not args.model.is_file():
        raise UserError(f"{args.model}: no such model file")
    if args.model.suffix != ".tod":
        raise UserError(f"{args.model}: not a .tod model (convert it with `edgetune convert`)")
    if not args.data.is_dir():
        raise UserError(f"{args.data}: no such dataset folder")
    for name in ("cycles", "save_every", "warmup"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0")
    if args.weight_decay is not None and not (args.weight_decay >= 0 and math.isfinite(args.weight_decay)):
        raise UserError(f"--weight-decay must be a finite number >= 0, got {args.weight_decay}")
    if args.lr is not None and not (args.lr >= 0 and math.isfinite(args.lr)):
        raise UserError(f"--lr must be a finite number >= 0, got {args.lr}")
    if args.test_every < 1:
        raise UserError("--test-every must be >= 1")
    if args.mixup is not None:
        check_mixup(args.mixup, "--mixup")
    if not (args.cache_budget >= 0 and math.isfinite(args.cache_budget)):
        raise UserError(f"--cache-budget must be a finite number of MiB >= 0, got {args.cache_budget:g}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")
    if args.auto_budget is not None and not args.auto:
        raise UserError("--auto-budget goes with --auto")
    if args.auto_budget is not None and not (args.auto_budget > 0 and math.isfinite(args.auto_budget)):
        raise UserError(f"--auto-budget must be a finite number of seconds > 0, got {args.auto_budget:g}")
    if args.plot is not None:
        _matplotlib()  # fail before training, not after


def _sample_bytes(session) -> int:
    """Bytes of one input sample, as the seed's verbose `data size` line."""
    shape = session.inputs[0].shape[1:]
    size = 4
    for d in shape:
        size *= int(d)
    return size


class FeatureProgress:
    """Progress on stderr of work told as `progress(what, done, total)`: the backbone over a split
    (`extracting train: 120/600 img`), or the `--auto` candidates (`searching auto: 3/12 candidate`)."""

    def __init__(self, what: str = "extracting", unit: str = "img") -> None:
        self.bar: Progress | None = None
        self.what, self.verb, self.unit = "", what, unit

    def __call__(self, what: str, done: int, total: int) -> None:
        """Advance the bar of `what`; a new label (or a restart) begins a new bar."""
        if self.bar is None or self.what != what or done < self.bar.done:
            self.bar, self.what = Progress(f"{self.verb} {what}", total, unit=self.unit), what
        self.bar.update(done - self.bar.done)
        if done >= total:
            self.bar.close()
            self.bar = None


class TensorPrinter(Callback):
    """`-v`: the output tensors after each step, as the seed's after_callback prints them."""

    def on_step(self, session, step: int, loss: float) -> None:
        """Print the loss and logits tensors of the step just taken."""
        import numpy as np

        logits = session.logits
        print(f"loss: shape () = {loss:g}", flush=True)
        print(f"logits: shape {logits.shape} =", np.array2string(logits, precision=6, threshold=64), flush=True)


class History(Callback):
    """Records every step's loss and every evaluation (as `--log` writes them), for `--plot`."""

    def __init__(self) -> None:
        self.records: list[dict] = []

    def on_step(self, session, step: int, loss: float) -> None:
        """Keep the step's loss."""
        self.records.append({"event": "step", "step": step, "loss": float(loss)})

    def on_evaluate(self, session, split: str, accuracy: float) -> None:
        """Keep an evaluation, at the step it happened."""
        self.records.append({"event": "evaluate", "split": split, "step": session.step, "accuracy": float(accuracy)})


def _matplotlib():
    """matplotlib's pyplot on the Agg backend (no display); a UserError when it is not installed."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("--plot needs matplotlib, which is not installed here (pip install matplotlib)") from None
    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot


def read_log(path: str | os.PathLike) -> list[dict]:
    """The records of a `--log` JSONL file (to plot a run made where matplotlib is missing)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def save_plot(records: Sequence[dict], path: str | os.PathLike) -> str:
    """Draw the loss per step, the test accuracy per evaluation and the final validation accuracy (PNG).

    Takes the records `--log` writes (see `read_log`), so a run made on a device without
    matplotlib can be plotted on the host. Uses the Agg backend: no display needed.

    Returns:
        The path written.
    """
    plt = _matplotlib()

    steps = [(r["step"], r["loss"]) for r in records if r.get("event") == "step"]
    evals = [(r["step"], r["accuracy"]) for r in records if r.get("event") == "evaluate" and r.get("split") == "test"]
    fig, loss_ax = plt.subplots(figsize=(8, 4.5))
    if steps:
        loss_ax.plot(*zip(*steps), color="tab:blue", linewidth=0.8, label="training loss")
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("loss", color="tab:blue")
    acc_ax = loss_ax.twinx()
    if evals:
        acc_ax.plot(*zip(*evals), "o-", color="tab:orange", label="test accuracy")
    validation = [(r["step"], r["accuracy"]) for r in records
                  if r.get("event") == "evaluate" and r.get("split") == "validation"]
    if validation:
        acc_ax.plot(*validation[-1], "*", color="tab:green", markersize=14,
                    label=f"validation accuracy {validation[-1][1]:g}")
    acc_ax.set_ylabel("accuracy", color="tab:orange")
    acc_ax.set_ylim(0, 1)
    handles = loss_ax.get_legend_handles_labels()[0] + acc_ax.get_legend_handles_labels()[0]
    if handles:
        acc_ax.legend(handles=handles, loc="center right")
    loss_ax.set_title("training loss and accuracy")
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=100)
    plt.close(fig)
    return os.fspath(path)


if __name__ == "__main__":
    sys.exit(main())
