"""`search`: choose learning rate, weight decay and step count on the test split, over cached features.

With the features cached a training step costs well under a millisecond, so the device can afford
to try recipes instead of asking the user for numbers. The backbone still runs once per image: the
search extracts every train and test feature once through the caller's session (`Trainer.features`),
and each candidate is a fresh copy of the model, built from the same `.tod`, whose feature cache is
filled from those arrays. Each candidate trains through the ordinary `Trainer` with the same seed,
so it sees the batches the final training will see, and the chosen recipe, retrained by the caller,
reproduces the candidate the search measured.

The plan, fixed before anything runs (so a seed fixes the result). Decays are counted in units of
1 / n_train: on a dense head, decay d is the L2 penalty of scikit-learn's LogisticRegression with
C = 1 / (d * n_train) (which leaves the bias out; the optimizers decay it too), so unit 1 is its
default C=1 and the grid spans the C range bench/probe.py searches.

1. **Learning rate**, at decay 1 / n_train: each rate of the optimizer's grid (`LR_GRIDS`). The rate
   decides how fast and how stably training reaches the regularized optimum (on a linear head over
   fixed features that optimum does not depend on it), so it is chosen first, at a typical decay.
2. **Weight decay**, at that rate: each other multiple in `DECAY_FACTORS`, 0 included. Decay is what
   a converged L2 logistic regression has and the demo recipe lacks: without it the head overfits
   the train split (issue 12).

Every candidate anneals the rate to 0 with a cosine over the same horizon (`EPOCHS` passes over the
train split, within `MIN_STEPS` / `MAX_STEPS`) and is evaluated on the test split every
`horizon / EVALUATIONS` steps. Its score is its best evaluation: the highest test accuracy, ties
broken by the lower test loss (accuracy moves in steps of 1 / n_test, so near-equal candidates are
common and the loss is the steadier judge), then by the earlier step; the chosen step count is where
that evaluation was. Ties between candidates go to the one run first. A candidate whose training
diverges scores nothing and the search goes on.

The budget bounds the search's wall time: no candidate starts once it is spent (the first always
runs), and rows of candidates not run say so. The plan is sized to fit the default budget with room
to spare on the demo's 100 images per class, so the budget only bites on slow devices, and a result
cut short by it is marked as such (then it depends on the machine's speed, not just the seed).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from edgetune.errors import UserError
from edgetune.runtime import format as tod_format
from edgetune.runtime.callbacks import Callback, CosineLR
from edgetune.runtime.session import Context, TrainingDiverged, TrainSession
from edgetune.runtime.trainer import Split, Trainer

# Learning rates tried in stage 1, by optimizer (`meta["optimizer"]["name"]`).
LR_GRIDS: dict[str, tuple[float, ...]] = {
    "sgd": (0.003, 0.01, 0.03, 0.1),
    "adam": (0.0003, 0.001, 0.003, 0.01),
    "adamw": (0.0003, 0.001, 0.003, 0.01),
}
# Weight decays tried, as multiples of 1 / n_train (PyTorch semantics: `grad += decay * weight`). On a
# dense head, decay d is the L2 penalty of scikit-learn's LogisticRegression with C = 1 / (d * n_train):
# factor 1 is its default C=1, and the factors span C = 10 ... 0.001 (0 = no decay), bench/probe.py's range.
DECAY_FACTORS: tuple[float, ...] = (0.0, 0.1, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)
EPOCHS = 50          # the cosine horizon, in passes over the train split ...
MIN_STEPS = 200      # ... but at least this many steps
MAX_STEPS = 6000     # ... and at most this many
EVALUATIONS = 20     # test evaluations per candidate (the step count is chosen among these)
DEFAULT_BUDGET = 60.0  # seconds for the candidates; the demo's plan takes a fraction of it

Clock = Callable[[], float]
Progress = Callable[[str, int, int], None]  # (what, done, total), as the Trainer's


@dataclass(frozen=True)
class Recipe:
    """What the search chose: train `steps` steps with this rate and decay, cosine-annealed over `horizon`.

    Attributes:
        lr: the base learning rate (the cosine starts there).
        weight_decay: PyTorch-style weight decay of the model's optimizer.
        steps: how many steps to train (where the best test accuracy was reached; <= horizon).
        horizon: the cosine schedule's total steps (`CosineLR(horizon)`).
        test_accuracy: the test accuracy the search measured at `steps`.
        test_loss: the mean test cross-entropy there.
    """

    lr: float
    weight_decay: float
    steps: int
    horizon: int
    test_accuracy: float
    test_loss: float


@dataclass(frozen=True)
class Trial:
    """One candidate of the search, as a row of its table.

    Attributes:
        stage: "lr" or "weight_decay".
        lr: the learning rate tried.
        weight_decay: the weight decay tried.
        status: "ok", "diverged" (training stopped on a non-finite value) or "skipped (budget)".
        best_step: the step of the best evaluation (0 if none was measured).
        test_accuracy: the test accuracy there (nan if none was measured).
        test_loss: the mean test cross-entropy there (nan if none was measured).
        last_test_accuracy: the test accuracy at the end of the horizon (nan if not reached).
        seconds: wall time of the candidate.
    """

    stage: str
    lr: float
    weight_decay: float
    status: str
    best_step: int = 0
    test_accuracy: float = math.nan
    test_loss: float = math.nan
    last_test_accuracy: float = math.nan
    seconds: float = 0.0

    @property
    def score(self) -> tuple[float, float, int]:
        """Higher is better: test accuracy, then lower test loss, then fewer steps; a failed run is last."""
        if self.status != "ok":
            return (-math.inf, -math.inf, 0)
        return score(self.test_accuracy, self.test_loss, self.best_step)


def score(accuracy: float, loss: float, step: int) -> tuple[float, float, int]:
    """The order of evaluations: higher accuracy, then lower loss, then the earlier step."""
    return (accuracy, -loss, -step)


@dataclass
class SearchResult:
    """The chosen recipe and every candidate, in the order they ran.

    Attributes:
        recipe: the choice.
        trials: one row per candidate of the plan (run or skipped).
        horizon: the cosine horizon every candidate used.
        test_every: steps between test evaluations.
        seconds: wall time of the candidates (extraction not included).
        budget: the budget in seconds.
        budget_spent: True when candidates were skipped for lack of budget.
    """

    recipe: Recipe
    trials: list[Trial]
    horizon: int
    test_every: int
    seconds: float
    budget: float
    budget_spent: bool = False

    def rows(self) -> list[dict[str, Any]]:
        """JSON-ready records: one `auto_trial` per candidate and one `auto_choice`."""
        rows = [{"event": "auto_trial", **asdict(t)} for t in self.trials]
        rows.append({"event": "auto_choice", **asdict(self.recipe), "seconds": self.seconds, "budget": self.budget,
                     "budget_spent": self.budget_spent})
        return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows]

    def table(self) -> str:
        """A short fixed-width table of the candidates and the choice, for the console."""
        lines = [f"auto: {len(self.trials)} candidates, cosine over {self.horizon} steps, test every "
                 f"{self.test_every}", f"{'stage':<13}{'lr':>9}{'decay':>10}{'best step':>10}{'test acc':>9}"
                 f"{'loss':>7}{'at end':>8}{'s':>7}  status"]
        for t in self.trials:
            acc, loss, last = (("" if math.isnan(v) else f"{v:.4f}"[:6])
                               for v in (t.test_accuracy, t.test_loss, t.last_test_accuracy))
            lines.append(f"{t.stage:<13}{t.lr:>9g}{t.weight_decay:>10.3g}{t.best_step or '':>10}{acc:>9}{loss:>7}"
                         f"{last:>8}{t.seconds:>7.1f}  {t.status}")
        r = self.recipe
        note = " (budget spent: candidates skipped)" if self.budget_spent else ""
        lines.append(f"auto: chose lr {r.lr:g}, weight decay {r.weight_decay:g}, {r.steps} steps (cosine over "
                     f"{r.horizon}), test accuracy {r.test_accuracy:.4f}, in {self.seconds:.1f} s{note}")
        return "\n".join(lines)


class _BestTest(Callback):
    """Observes one candidate's test evaluations: the best (see `score`) and the last accuracy.

    The Trainer measures accuracy; the loss comes from one more forward pass over the test features
    in eval mode (no step, no state change), as `Trainer.accuracy` itself runs them.
    """

    def __init__(self, features: np.ndarray, labels: np.ndarray) -> None:
        self.features, self.labels = features, labels
        self.best: tuple[float, float, int] | None = None
        self.last = math.nan

    def on_evaluate(self, session: TrainSession, split: str, accuracy: float) -> None:
        if split != "test":
            return
        was_training = session.training
        session.eval()
        try:
            loss = float(session.run_head(self.features, self.labels)["loss"])
        finally:
            if was_training:
                session.train()
        self.last = accuracy
        if self.best is None or score(accuracy, loss, session.step) > score(*self.best):
            self.best = (accuracy, loss, session.step)


def horizon_for(train_size: int, batch_size: int, epochs: int = EPOCHS) -> int:
    """The cosine horizon: `epochs` passes over the train split, within [MIN_STEPS, MAX_STEPS],
    rounded up to a multiple of `EVALUATIONS` so that the last step is evaluated."""
    steps = epochs * math.ceil(train_size / max(1, min(batch_size, train_size)))
    steps = min(MAX_STEPS, max(MIN_STEPS, steps))
    return math.ceil(steps / EVALUATIONS) * EVALUATIONS


def recipe_session(model: tod_format.TodFile, lr: float, weight_decay: float, ctx: Context | None = None,
                   path: str | None = None) -> TrainSession:
    """A fresh session of `model` whose optimizer has this learning rate and weight decay.

    The search builds its candidates with it, and a caller trains the chosen recipe with it. The
    weights, optimizer slots and step count are copies of the model's (a checkpoint continues); a
    learning-rate schedule's saved base rate is dropped, since this rate starts a new schedule.

    Raises:
        UserError: a learning rate or weight decay that is negative or not finite.
    """
    check_number("learning rate", lr, positive=True)
    check_number("weight decay", weight_decay, positive=False)
    meta = copy.deepcopy(model.meta)
    meta["optimizer"] = {**meta["optimizer"], "lr": float(lr), "weight_decay": float(weight_decay)}
    meta["training"].pop("base_lr", None)  # a schedule of an earlier run would override this rate (CosineLR)
    tensors = {name: np.array(t, copy=True) for name, t in model.tensors.items()}  # a session trains its arrays in place
    return TrainSession(tod_format.TodFile(meta=meta, tensors=tensors, blobs=model.blobs, version=model.version),
                       ctx or Context(), path)


def search(session: TrainSession, train: Split, test: Split, *, model: tod_format.TodFile | None = None,
           seed: int = 0, budget: float = DEFAULT_BUDGET, lrs: Sequence[float] | None = None,
           decay_factors: Sequence[float] = DECAY_FACTORS, epochs: int = EPOCHS, clock: Clock = time.monotonic,
           progress: Progress | None = None) -> SearchResult:
    """Choose learning rate, weight decay and step count on the test split (see the module docstring).

    Args:
        session: the model to tune. Its feature cache is filled (or read) once for both splits; it
            is not trained (its record notes the seed, as any Trainer's would).
        train: the split candidates train on.
        test: the split candidates are scored on.
        model: the `.tod` candidates start from; None loads the file `session` was created from.
            It must hold the state `session` is in, so that the recipe carries over.
        seed: the data order and dropout seed of every candidate (the final training's seed).
        budget: seconds of candidate training; no candidate starts after that (the first always runs).
        lrs: learning rates of stage 1; None uses `LR_GRIDS` for the model's optimizer.
        decay_factors: weight decays in units of 1 / len(train), each >= 0; 1 must be among them
            (stage 1 runs there).
        epochs: the cosine horizon in passes over `train` (see `horizon_for`).
        clock: seconds, monotonic (tests pass a fake one).
        progress: told `("auto", candidates done, candidates planned)` after each candidate.

    Returns:
        The chosen recipe and the table of candidates.

    Raises:
        UserError: a bad budget, rate, decay or epoch count; an empty split; no model to copy;
            every candidate diverged.
    """
    check_number("--auto-budget", budget, positive=True, unit=" seconds")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise UserError(f"epochs must be a whole number >= 1, got {epochs!r}")
    if len(train) == 0 or len(test) == 0:
        raise UserError("the auto search needs a non-empty train and test split")
    if lrs is None:
        optimizer = session.meta["optimizer"]["name"]
        if optimizer not in LR_GRIDS:
            raise UserError(f"no learning-rate grid for optimizer {optimizer!r} (known: {', '.join(sorted(LR_GRIDS))})")
        lrs = LR_GRIDS[optimizer]
    if not lrs:
        raise UserError("the auto search needs at least one learning rate")
    for lr in lrs:
        check_number("learning rate", lr, positive=True)
    for factor in decay_factors:
        check_number("weight decay factor", factor, positive=False)
    if 1.0 not in decay_factors:
        raise UserError(f"decay_factors must include 1 (scikit-learn's C=1, where stage 1 runs), got {list(decay_factors)}")
    if model is None:
        if session.path is None:
            raise UserError("the auto search needs the model file: pass model= for a session not loaded from a file")
        model = tod_format.load_file(session.path)

    extractor = Trainer(session, train, test, seed=seed, target_accuracy=None)
    features = _Features(train, extractor.features(train), test, extractor.features(test))
    horizon = horizon_for(len(train), session.batch_size, epochs)
    test_every = horizon // EVALUATIONS
    unit = 1.0 / len(train)
    plan: list[tuple[str, float | None, float]] = [("lr", lr, unit) for lr in lrs]
    plan += [("weight_decay", None, f * unit) for f in decay_factors if f != 1.0]
    trials: list[Trial] = []
    start = clock()
    for number, (stage, lr, wd) in enumerate(plan):
        if lr is None:  # stage 2 runs at stage 1's best rate
            lr = max((t for t in trials if t.stage == "lr"), key=lambda t: t.score).lr
        if trials and clock() - start >= budget:
            trials.append(Trial(stage, lr, wd, "skipped (budget)"))
        else:
            trials.append(_run_candidate(model, features, stage, lr, wd, seed, horizon, test_every, clock))
        if progress is not None:
            progress("auto", number + 1, len(plan))
    ran = [t for t in trials if t.status == "ok"]
    if not ran:
        raise UserError("every auto candidate diverged: pass lower learning rates (lrs=)")
    best = max(ran, key=lambda t: t.score)  # max keeps the first of equals: ties go to the earlier candidate
    recipe = Recipe(best.lr, best.weight_decay, best.best_step, horizon, best.test_accuracy, best.test_loss)
    return SearchResult(recipe, trials, horizon, test_every, clock() - start, float(budget),
                        any(t.status.startswith("skipped") for t in trials))


@dataclass(frozen=True)
class _Features:
    """Both splits with their extracted features (the search holds them; candidates copy them in)."""

    train: Split
    train_rows: np.ndarray
    test: Split
    test_rows: np.ndarray


def _run_candidate(model: tod_format.TodFile, features: _Features, stage: str, lr: float, wd: float, seed: int,
                   horizon: int, test_every: int, clock: Clock) -> Trial:
    """Train one fresh copy for `horizon` steps through the Trainer, cosine-annealed; its best evaluation."""
    began = clock()
    candidate = recipe_session(model, lr, wd, Context(cache=True))
    candidate.feature_cache.put_many(features.train.keys, features.train_rows)  # the backbone already ran
    candidate.feature_cache.put_many(features.test.keys, features.test_rows)
    observer = _BestTest(features.test_rows, np.asarray(features.test.labels))
    trainer = Trainer(candidate, features.train, features.test, callbacks=[CosineLR(horizon), observer], seed=seed,
                      test_every=test_every, target_accuracy=None)
    try:
        trainer.fit(horizon)
    except TrainingDiverged:
        return Trial(stage, lr, wd, "diverged", seconds=clock() - began)
    accuracy, loss, step = observer.best
    return Trial(stage, lr, wd, "ok", step, accuracy, loss, observer.last, clock() - began)


def check_number(what: str, value: Any, *, positive: bool, unit: str = "") -> None:
    """Refuse a value that is not a finite number, or not > 0 (`positive`) / not >= 0, with one clear line."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= 0 if positive else value < 0):
        bound = "> 0" if positive else ">= 0"
        raise UserError(f"{what} must be a finite number {bound}{unit}, got {value!r}")

