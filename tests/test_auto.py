"""The --auto search (edgetune.runtime.auto) on the tiny model: determinism, budget, bad values, reproduction."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from edgetune.errors import UserError
from edgetune.runtime import Context, CosineLR, Trainer, TrainSession
from edgetune.runtime import auto
from edgetune.runtime import format as tod_format

SMALL = {"lrs": (0.01, 0.1), "decay_factors": (0.0, 1.0, 30.0), "epochs": 1,
         "horizon_factors": (1.0,)}  # 4 candidates of 200 steps


class FakeClock:
    """A clock that moves only when told: `advance` is handed to `search` as its progress callback."""

    def __init__(self, step: float) -> None:
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        return self.now

    def advance(self, what: str, done: int, total: int) -> None:
        self.now += self.step


@pytest.fixture
def setup(tiny_tod, tiny_split):
    """A fresh session of a dense-head tiny model and its train/test splits."""
    def make(seed_data: int = 0):
        path = tiny_tod(head="dense")
        session = TrainSession.create(path, Context())
        return path, session, tiny_split(40, seed=seed_data), tiny_split(20, seed=seed_data + 1, name="test")
    return make


def without_time(result: auto.SearchResult) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in result.rows()]


def test_same_seed_same_search_and_another_seed_another(setup) -> None:
    runs = []
    for seed in (3, 3, 4):
        _, session, train, test = setup()
        runs.append(without_time(auto.search(session, train, test, seed=seed, clock=FakeClock(0), **SMALL)))
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]  # the seed reaches the data order: losses differ
    assert [r["status"] for r in runs[0][:-1]] == ["ok"] * 4


def test_plan_is_rates_at_unit_decay_then_decays_at_the_best_rate_then_steps(setup) -> None:
    _, session, train, test = setup()
    result = auto.search(session, train, test, clock=FakeClock(0), **{**SMALL, "horizon_factors": (0.5, 1.0, 2.0)})
    unit, horizon = 1 / len(train), auto.MIN_STEPS
    stages = [(t.stage, t.lr, t.weight_decay, t.steps) for t in result.trials]
    best_lr = max(result.trials[:2], key=lambda t: t.score).lr
    best = max(result.trials[:4], key=lambda t: t.score)
    assert stages == [("lr", 0.01, unit, horizon), ("lr", 0.1, unit, horizon),
                      ("weight_decay", best_lr, 0.0, horizon), ("weight_decay", best_lr, 30 * unit, horizon),
                      ("steps", best.lr, best.weight_decay, horizon // 2),
                      ("steps", best.lr, best.weight_decay, 2 * horizon)]
    chosen = max(result.trials, key=lambda t: t.score)
    r = result.recipe
    assert (r.lr, r.weight_decay, r.steps, r.test_accuracy, r.test_loss) == (
        chosen.lr, chosen.weight_decay, chosen.steps, chosen.test_accuracy, chosen.test_loss)
    assert result.horizon == horizon


def test_budget_stops_starting_candidates(setup) -> None:
    _, session, train, test = setup()
    clock = FakeClock(10.0)  # each candidate "takes" 10 s
    result = auto.search(session, train, test, budget=25, clock=clock, progress=clock.advance, **SMALL)
    assert [t.status for t in result.trials] == ["ok"] * 3 + ["skipped (budget)"]  # started at 0, 10, 20
    assert result.budget_spent and "budget spent" in result.table()
    assert result.rows()[-1]["budget_spent"] is True and result.rows()[-2]["test_accuracy"] is None


def test_the_first_candidate_runs_whatever_the_budget(setup) -> None:
    _, session, train, test = setup()
    clock = FakeClock(1000.0)
    result = auto.search(session, train, test, budget=1e-9, clock=clock, progress=clock.advance, **SMALL)
    assert [t.status for t in result.trials].count("ok") == 1
    assert result.recipe.lr == result.trials[0].lr


def test_the_recipe_retrained_reproduces_what_the_search_measured(setup) -> None:
    path, session, train, test = setup()
    result = auto.search(session, train, test, seed=5, clock=FakeClock(0), **SMALL)
    r = result.recipe
    assert r.zero_classifier  # a fresh model
    final = auto.recipe_session(tod_format.load_file(path), r.lr, r.weight_decay, zero_classifier=True)
    trainer = Trainer(final, train, test, callbacks=[CosineLR(r.steps)], seed=5, target_accuracy=None,
                      test_every=0)
    trainer.fit(r.steps)
    assert final.step == r.steps
    assert trainer.evaluate("test") == r.test_accuracy


def test_the_classifier_is_the_layer_that_writes_the_logits(tiny_tod) -> None:
    dense = TrainSession.create(tiny_tod(head="dense"), Context())
    mlp = TrainSession.create(tiny_tod(head="mlp"), Context())
    assert auto.classifier(dense.head) == ("head.weight", "head.bias")
    last = auto.classifier(mlp.head)
    assert len(last) == 2 and set(last) < set(mlp.params)  # the last layer's only
    auto.prepare(mlp, 0.01, 0.0, zero_classifier=True)
    for name, p in mlp.params.items():
        assert (not p.data.any()) == (name in last)  # the earlier layer keeps its random start (else no gradient)


def test_a_fresh_model_starts_from_a_zero_classifier_and_a_trained_one_continues(setup, tiny_split) -> None:
    path, session, train, test = setup()
    assert auto.search(session, train, test, clock=FakeClock(0), **SMALL).recipe.zero_classifier
    Trainer(session, train, test_every=0).fit(3)
    session.save(path)
    session = TrainSession.create(path, Context())
    before = session.parameters()
    result = auto.search(session, train, test, clock=FakeClock(0), **SMALL)
    assert not result.recipe.zero_classifier and "classifier from zero" not in result.table()
    continued = auto.recipe_session(tod_format.load_file(path), 0.01, 0.0, zero_classifier=False)
    assert all(np.array_equal(before[n], v) for n, v in continued.parameters().items())


def test_backbone_runs_once_per_image_and_the_session_is_not_trained(setup) -> None:
    _, session, train, test = setup()
    before = session.parameters()
    auto.search(session, train, test, clock=FakeClock(0), **SMALL)
    assert (train.decoded, test.decoded) == (len(train), len(test))  # 4 candidates, each image decoded once
    assert session.step == 0
    assert all(np.array_equal(before[n], v) for n, v in session.parameters().items())


def test_rows_are_json_and_the_table_names_the_choice(setup) -> None:
    _, session, train, test = setup()
    result = auto.search(session, train, test, clock=FakeClock(0), **SMALL)
    rows = json.loads(json.dumps(result.rows()))
    assert [r["event"] for r in rows] == ["auto_trial"] * 4 + ["auto_choice"]
    assert rows[-1]["lr"] == result.recipe.lr and rows[-1]["steps"] == result.recipe.steps
    assert f"chose lr {result.recipe.lr:g}" in result.table()


def test_every_candidate_diverging_is_a_clear_error(setup) -> None:
    _, session, train, test = setup()
    with pytest.raises(UserError, match="every auto candidate diverged"):
        auto.search(session, train, test, lrs=(1e30,), decay_factors=(1.0,), epochs=1, clock=FakeClock(0))


@pytest.mark.parametrize("kwargs, message", [
    ({"budget": 0}, r"--auto-budget must be a finite number > 0 seconds, got 0"),
    ({"budget": -5.0}, r"--auto-budget must be a finite number > 0 seconds"),
    ({"budget": math.nan}, r"--auto-budget must be a finite number > 0 seconds"),
    ({"budget": True}, r"--auto-budget must be a finite number > 0 seconds"),
    ({"lrs": (0.01, -0.1)}, r"learning rate must be a finite number > 0, got -0.1"),
    ({"lrs": ()}, r"at least one learning rate"),
    ({"decay_factors": (-1.0, 1.0)}, r"weight decay factor must be a finite number >= 0, got -1.0"),
    ({"decay_factors": (0.0, 10.0)}, r"decay_factors must include 1"),
    ({"epochs": 0}, r"epochs must be a whole number >= 1, got 0"),
    ({"horizon_factors": (0.0, 1.0)}, r"horizon factor must be a finite number > 0, got 0.0"),
    ({"horizon_factors": (0.5, 2.0)}, r"horizon_factors must include 1"),
])
def test_bad_values_are_refused_before_any_work(setup, kwargs, message) -> None:
    _, session, train, test = setup()
    with pytest.raises(UserError, match=message):
        auto.search(session, train, test, **kwargs)
    assert train.decoded == 0


def test_recipe_session_refuses_a_negative_decay_and_copies_the_weights(tiny_tod) -> None:
    model = tod_format.load_file(tiny_tod(head="dense"))
    with pytest.raises(UserError, match="weight decay must be a finite number >= 0, got -0.001"):
        auto.recipe_session(model, 0.01, -0.001)
    a, b = auto.recipe_session(model, 0.01, 0.0), auto.recipe_session(model, 0.01, 0.5)
    assert b.meta["optimizer"]["weight_decay"] == 0.5 and model.meta["optimizer"]["weight_decay"] == 0.0
    a.train().run_head(np.ones((4, 8), np.float32), np.array([0, 1, 2, 0]))
    assert not np.array_equal(a.parameters()["head.weight"], b.parameters()["head.weight"])  # no shared arrays


def test_a_session_without_a_file_needs_the_model(tiny_split) -> None:
    from tests.fixtures_runtime import tiny_model

    session = TrainSession(tiny_model(head="dense"), Context())
    with pytest.raises(UserError, match="pass model="):
        auto.search(session, tiny_split(40), tiny_split(20, seed=1, name="test"))


def test_recipe_session_starts_a_new_schedule_from_a_checkpoint(tiny_tod, tiny_split) -> None:
    model = tod_format.load_file(tiny_tod(head="dense"))
    model.meta["training"]["base_lr"] = 5.0  # left by an earlier cosine run
    session = auto.recipe_session(model, 0.01, 0.0)
    Trainer(session, tiny_split(40), callbacks=[CosineLR(100)], test_every=0).fit(1)
    assert session.learning_rate == pytest.approx(0.01 * (1 + math.cos(math.pi / 100)) / 2)
