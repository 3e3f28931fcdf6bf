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
3. **Steps**, at that rate and decay: the horizon scaled by each other factor of `HORIZON_FACTORS`.

Every candidate anneals the rate to 0 with a cosine over its horizon (`EPOCHS` passes over the train
split, within `MIN_STEPS` / `MAX_STEPS`, times the stage-3 factor) and is scored once, at its end, on
the test split: the highest test accuracy, ties broken by the lower test loss (accuracy moves in
steps of 1 / n_test, so near-equal candidates are common and the loss is the steadier judge), then by
fewer steps. Ties between candidates go to the one run first. A candidate whose training diverges
scores nothing and the search goes on. A trained-out candidate is what the logistic regression's C
is chosen on; the best of many evaluations along the way was tried first and measured worse on the
dev sets below: it overstated validation accuracy twice as much and landed under the run's end
(bench/RESULTS.md, issue 12).

A fresh model's classifier (the layer that writes the logits) starts at zero in every candidate and in
the final run, as the logistic regression's solver starts: a random initial classifier keeps, in the
directions the features barely span, a component that only weight decay shrinks, by a factor
(1 - lr * decay) per step, nothing within the horizon at these rates, and the head then ends away
from the regularized optimum. bench/zero_start.py measures it on three Fashion-MNIST sets disjoint
from every reported one (bench/RESULTS.md): at weak decay the head ends further under the logistic
regression at the same C from a random start than from zero. A model that has trained (step > 0)
continues from its weights, and its cosine starts at its step from the candidate's rate (not from the
base rate or the curve of the run that trained it).

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
from edgetune.runtime.callbacks import CosineLR
from edgetune.runtime.module import Module
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
MAX_STEPS = 6000     # ... and at most this many (stage 3 scales the bounded horizon)
HORIZON_FACTORS: tuple[float, ...] = (0.5, 1.0, 2.0)  # stage 3's step counts, as multiples of the horizon
DEFAULT_BUDGET = 60.0  # seconds for the candidates; the demo's plan takes a fraction of it

Clock = Callable[[], float]
Progress = Callable[[str, int, int], None]  # (what, done, total), as the Trainer's


@dataclass(frozen=True)
class Recipe:
    """What the search chose: train `steps` steps with this rate and decay, cosine-annealed to 0 over them.

    Attributes:
        lr: the base learning rate (the cosine starts there).
        weight_decay: PyTorch-style weight decay of the model's optimizer.
        steps: how many steps to train, the cosine's horizon (`CosineLR(steps, start=<model step>)`).
        test_accuracy: the test accuracy the search measured after `steps`.
        test_loss: the mean test cross-entropy there.
        zero_classifier: start from a zero classifier (`prepare`): a fresh model's recipe does.
    """

    lr: float
    weight_decay: float
    steps: int
    test_accuracy: float
    test_loss: float
    zero_classifier: bool = False


@dataclass(frozen=True)
class Trial:
    """One candidate of the search, as a row of its table.

    Attributes:
        stage: "lr", "weight_decay" or "steps".
        lr: the learning rate tried.
        weight_decay: the weight decay tried.
        steps: the horizon tried (trained to its end).
        status: "ok", "diverged" (training stopped on a non-finite value) or "skipped (budget)".
        test_accuracy: the test accuracy at the end (nan if not measured).
        test_loss: the mean test cross-entropy there (nan if not measured).
        seconds: wall time of the candidate.
    """

    stage: str
    lr: float
    weight_decay: float
    steps: int
    status: str
    test_accuracy: float = math.nan
    test_loss: float = math.nan
    seconds: float = 0.0

    @property
    def score(self) -> tuple[float, float, int]:
        """Higher is better: test accuracy, then lower test loss, then fewer steps; a failed run is last."""
        if self.status != "ok":
            return (-math.inf, -math.inf, 0)
        return (self.test_accuracy, -self.test_loss, -self.steps)


@dataclass
class SearchResult:
    """The chosen recipe and every candidate, in the order they ran.

    Attributes:
        recipe: the choice.
        trials: one row per candidate of the plan (run or skipped).
        horizon: the horizon of stages 1 and 2 (stage 3 scales it).
        seconds: wall time of the candidates (extraction not included).
        budget: the budget in seconds.
        budget_spent: True when candidates were skipped for lack of budget.
    """

    recipe: Recipe
    trials: list[Trial]
    horizon: int
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
        lines = [f"auto: {len(self.trials)} candidates, each trained to the end of its cosine and scored there",
                 f"{'stage':<13}{'lr':>9}{'decay':>10}{'steps':>7}{'test acc':>9}{'loss':>7}{'s':>7}  status"]
        for t in self.trials:
            acc, loss = (("" if math.isnan(v) else f"{v:.4f}"[:6]) for v in (t.test_accuracy, t.test_loss))
            lines.append(f"{t.stage:<13}{t.lr:>9g}{t.weight_decay:>10.3g}{t.steps:>7}{acc:>9}{loss:>7}"
                         f"{t.seconds:>7.1f}  {t.status}")
        r = self.recipe
        note = " (budget spent: candidates skipped)" if self.budget_spent else ""
        start = ", classifier from zero" if r.zero_classifier else ""
        lines.append(f"auto: chose lr {r.lr:g}, weight decay {r.weight_decay:g}, {r.steps} steps (cosine{start}), "
                     f"test accuracy {r.test_accuracy:.4f}, in {self.seconds:.1f} s{note}")
        return "\n".join(lines)


def horizon_for(train_size: int, batch_size: int, epochs: int = EPOCHS) -> int:
    """The cosine horizon of stages 1 and 2: `epochs` passes over the train split, within [MIN_STEPS, MAX_STEPS]."""
    steps = epochs * math.ceil(train_size / max(1, min(batch_size, train_size)))
    return min(MAX_STEPS, max(MIN_STEPS, steps))


def recipe_session(model: tod_format.TodFile, lr: float, weight_decay: float, ctx: Context | None = None,
                   path: str | None = None, zero_classifier: bool = False) -> TrainSession:
    """A fresh session of `model`, set by `prepare` to start training with this recipe.

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
    tensors = {name: np.array(t, copy=True) for name, t in model.tensors.items()}  # a session trains its arrays in place
    session = TrainSession(tod_format.TodFile(meta=meta, tensors=tensors, blobs=model.blobs, version=model.version),
                           ctx or Context(), path)
    prepare(session, float(lr), float(weight_decay), zero_classifier)
    return session


def prepare(session: TrainSession, lr: float, weight_decay: float, zero_classifier: bool) -> None:
    """Set `session` to start a recipe: its rate and decay, and the classifier zeroed if asked (module docstring).

    net_runner --auto sets its own session with it, so the final run starts as the candidates did.
    """
    session.restart_learning_rate(lr)  # the base of the cosine that follows, not an earlier run's
    session.weight_decay = weight_decay
    if zero_classifier:
        for name in classifier(session.head):
            session.params[name].data[...] = 0


def classifier(module: Module) -> tuple[str, ...]:
    """The parameters of the layer that writes the logits: a Gemm's, or a MatMul's and its bias Add's.

    Empty when the logits come from another op (then nothing is zeroed).
    """
    writer = {node.outputs[0]: node for node in module.nodes}
    names: list[str] = []
    node = writer.get(module.output)
    while node is not None and node.op_type in ("Gemm", "MatMul", "Add"):
        names += [name for name in node.inputs if name in module.params]
        inner = [writer[name] for name in node.inputs if name in writer]
        node = inner[0] if node.op_type == "Add" and len(inner) == 1 and inner[0].op_type == "MatMul" else None
    return tuple(names)


def search(session: TrainSession, train: Split, test: Split, *, model: tod_format.TodFile | None = None,
           seed: int = 0, budget: float = DEFAULT_BUDGET, lrs: Sequence[float] | None = None,
           decay_factors: Sequence[float] = DECAY_FACTORS, epochs: int = EPOCHS,
           horizon_factors: Sequence[float] = HORIZON_FACTORS, clock: Clock = time.monotonic,
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
        epochs: the cosine horizon of stages 1 and 2 in passes over `train` (see `horizon_for`).
        horizon_factors: stage 3's horizons as multiples of that one, each > 0; 1 must be among them.
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
    for factor in horizon_factors:
        check_number("horizon factor", factor, positive=True)
    if 1.0 not in horizon_factors:
        raise UserError(f"horizon_factors must include 1 (stages 1 and 2 run there), got {list(horizon_factors)}")
    if model is None:
        if session.path is None:
            raise UserError("the auto search needs the model file: pass model= for a session not loaded from a file")
        model = tod_format.load_file(session.path)

    zero = session.step == 0  # a fresh model: its classifier starts at zero (module docstring)
    extractor = Trainer(session, train, test, seed=seed, target_accuracy=None)
    features = _Features(train, extractor.features(train), test, extractor.features(test))
    horizon = horizon_for(len(train), session.batch_size, epochs)
    unit = 1.0 / len(train)
    plan: list[tuple[str, float | None, float | None, int]] = [("lr", lr, unit, horizon) for lr in lrs]
    plan += [("weight_decay", None, f * unit, horizon) for f in decay_factors if f != 1.0]
    plan += [("steps", None, None, max(1, round(f * horizon))) for f in horizon_factors if f != 1.0]
    trials: list[Trial] = []
    start = clock()
    for number, (stage, lr, wd, steps) in enumerate(plan):
        if stage == "weight_decay":  # at stage 1's best rate
            lr = max((t for t in trials if t.stage == "lr"), key=lambda t: t.score).lr
        elif stage == "steps":  # at the best rate and decay so far
            best = max(trials, key=lambda t: t.score)
            lr, wd = best.lr, best.weight_decay
        if trials and clock() - start >= budget:
            trials.append(Trial(stage, lr, wd, steps, "skipped (budget)"))
        else:
            trials.append(_run_candidate(model, features, stage, lr, wd, steps, zero, seed, clock))
        if progress is not None:
            progress("auto", number + 1, len(plan))
    ran = [t for t in trials if t.status == "ok"]
    if not ran:
        raise UserError("every auto candidate diverged: pass lower learning rates (lrs=)")
    best = max(ran, key=lambda t: t.score)  # max keeps the first of equals: ties go to the earlier candidate
    recipe = Recipe(best.lr, best.weight_decay, best.steps, best.test_accuracy, best.test_loss, zero)
    return SearchResult(recipe, trials, horizon, clock() - start, float(budget),
                        any(t.status.startswith("skipped") for t in trials))


@dataclass(frozen=True)
class _Features:
    """Both splits with their extracted features (the search holds them; candidates copy them in)."""

    train: Split
    train_rows: np.ndarray
    test: Split
    test_rows: np.ndarray


def _run_candidate(model: tod_format.TodFile, features: _Features, stage: str, lr: float, wd: float, steps: int,
                   zero_classifier: bool, seed: int, clock: Clock) -> Trial:
    """Train one fresh copy for `steps` steps through the Trainer, cosine-annealed to 0; scored at the end."""
    began = clock()
    candidate = recipe_session(model, lr, wd, Context(cache=True), zero_classifier=zero_classifier)
    candidate.feature_cache.put_many(features.train.keys, features.train_rows)  # the backbone already ran
    candidate.feature_cache.put_many(features.test.keys, features.test_rows)
    trainer = Trainer(candidate, features.train, features.test, callbacks=[CosineLR(steps, start=candidate.step)],
                      seed=seed,
                      test_every=0, target_accuracy=None)
    try:
        trainer.fit(steps)
    except TrainingDiverged:
        return Trial(stage, lr, wd, steps, "diverged", seconds=clock() - began)
    accuracy = trainer.evaluate("test")
    candidate.eval()  # the loss over the same features, no step taken
    loss = float(candidate.run_head(features.test_rows, np.asarray(features.test.labels))["loss"])
    return Trial(stage, lr, wd, steps, "ok", accuracy, loss, clock() - began)


def check_number(what: str, value: Any, *, positive: bool, unit: str = "") -> None:
    """Refuse a value that is not a finite number, or not > 0 (`positive`) / not >= 0, with one clear line."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= 0 if positive else value < 0):
        bound = "> 0" if positive else ">= 0"
        raise UserError(f"{what} must be a finite number {bound}{unit}, got {value!r}")

