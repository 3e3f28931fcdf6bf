"""Mixup at the cut (`edgetune.runtime.mixup`): the mix itself, the loss it trains, the Trainer's
wiring (the model's strength by default, exact resume) and the checks on the strength."""

from __future__ import annotations

import numpy as np
import pytest

from edgetune.errors import UserError
from edgetune.runtime import Context, Trainer, TrainSession
from edgetune.runtime import format as tod_format
from edgetune.runtime.meta import ModelError
from edgetune.runtime.mixup import mix
from tests.fixtures_runtime import RecordingSplit


def _batch(n: int = 6, classes: int = 4) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 5, 3, 3)).astype(np.float32), rng.integers(0, classes, n)


def test_a_mix_is_one_convex_combination_of_the_batch_with_a_permutation_of_itself() -> None:
    x, y = _batch()
    mixed, targets = mix(x, y, 4, 0.4, seed=3, step=7)
    assert mixed.dtype == targets.dtype == np.float32 and mixed.shape == x.shape and targets.shape == (6, 4)
    np.testing.assert_allclose(targets.sum(1), 1, rtol=1e-6)
    onehot = np.eye(4, dtype=np.float32)[y]
    rng = np.random.Generator(np.random.PCG64([3, 7]))
    want_lam = np.float32(rng.beta(0.4, 0.4))
    perm = rng.permutation(6)
    np.testing.assert_array_equal(mixed, want_lam * x + (1 - want_lam) * x[perm])
    np.testing.assert_array_equal(targets, want_lam * onehot + (1 - want_lam) * onehot[perm])


def test_the_draws_depend_on_seed_and_step_only() -> None:
    x, y = _batch()
    a = mix(x, y, 4, 0.2, seed=1, step=5)
    np.testing.assert_array_equal(a[0], mix(x, y, 4, 0.2, seed=1, step=5)[0])
    assert not np.array_equal(a[0], mix(x, y, 4, 0.2, seed=1, step=6)[0])
    assert not np.array_equal(a[0], mix(x, y, 4, 0.2, seed=2, step=5)[0])


def test_soft_targets_train_the_mixed_loss_of_the_two_labels(tiny_tod) -> None:
    """The session's loss on a mix's soft targets is lam * CE(y) + (1 - lam) * CE(y[perm]), the
    mixup loss (the loss is linear in the targets): the engine needs no loss of its own for it."""
    path = tiny_tod(head="dense", batch_size=6)
    features = np.random.default_rng(1).normal(size=(6, 8)).astype(np.float32)
    y = np.array([0, 1, 2, 0, 1, 2])
    mixed, targets = mix(features, y, 3, 0.4, seed=0, step=0)
    rng = np.random.Generator(np.random.PCG64([0, 0]))
    lam, perm = float(np.float32(rng.beta(0.4, 0.4))), rng.permutation(6)

    def loss(labels: np.ndarray) -> float:
        return float(TrainSession.create(path, Context(cache=False)).train().run_head(mixed, labels)["loss"])

    assert 0.05 < lam < 0.95  # a real mix, not one of the two samples
    assert loss(targets) == pytest.approx(lam * loss(y) + (1 - lam) * loss(y[perm]), rel=1e-5)


def _with_mixup(path: str, alpha: object, out) -> str:
    tod = tod_format.load_file(path)
    tod.meta["mixup"] = alpha
    return tod_format.save_file(tod, out)


def test_the_trainer_mixes_each_batch_with_the_runs_seed_and_step(tiny_tod, tiny_split) -> None:
    path = tiny_tod(head="dense", batch_size=4)
    train = RecordingSplit(tiny_split(14, seed=1))
    trained = TrainSession.create(path, Context(cache=False))
    Trainer(trained, train, seed=5, test_every=0, mixup=0.4).fit(6)

    by_hand = TrainSession.create(path, Context(cache=False)).train()
    for step, idx in enumerate(train.calls):
        features = by_hand.extract_features(train.split.images(idx))
        by_hand.run_head(*mix(features, train.labels[idx], 3, 0.4, seed=5, step=step))
    for name, p in trained.params.items():
        np.testing.assert_array_equal(by_hand.params[name].data, p.data)


def test_the_models_strength_is_the_default_and_the_argument_overrides_it(tiny_tod, tiny_split, tmp_path) -> None:
    path = tiny_tod(head="dense", batch_size=4)
    mixing = _with_mixup(path, 0.4, tmp_path / "mixing.tod")
    train = tiny_split(14, seed=1)

    def weights(model: str, **kwargs) -> np.ndarray:
        sess = TrainSession.create(model, Context(cache=False))
        Trainer(sess, train, seed=5, test_every=0, **kwargs).fit(6)
        return sess.params["head.weight"].data.copy()

    assert TrainSession.create(mixing).mixup == 0.4 and TrainSession.create(path).mixup == 0.0
    np.testing.assert_array_equal(weights(mixing), weights(path, mixup=0.4))
    np.testing.assert_array_equal(weights(mixing, mixup=0), weights(path))
    assert not np.array_equal(weights(mixing), weights(path))


def test_a_mixup_run_resumes_bit_identically(tiny_tod, tiny_split, tmp_path) -> None:
    """The draws are seeded by (seed, step), which the checkpoint holds: 4 + 7 steps == 11 steps."""
    path = _with_mixup(tiny_tod(head="mlp", batch_size=4), 0.2, tmp_path / "m.tod")
    train = tiny_split(14, seed=1)
    full = TrainSession.create(path, Context(cache=False))
    Trainer(full, train, seed=5, test_every=0).fit(11)
    part = TrainSession.create(path, Context(cache=False))
    saved = Trainer(part, train, seed=5, test_every=0, save_every=4,
                    checkpoint_pattern=tmp_path / "ckpt_{step}.tod").fit(4).saved
    resumed = TrainSession.create(saved[0], Context(cache=False))
    Trainer(resumed, train, seed=999, test_every=0).fit(7)
    a, b = full.save(tmp_path / "full.tod"), resumed.save(tmp_path / "resumed.tod")
    assert open(a, "rb").read() == open(b, "rb").read()


@pytest.mark.parametrize("alpha", [-0.1, 10.5, float("nan"), float("inf"), "0.2", True])
def test_a_bad_strength_is_refused_in_the_model_and_as_an_argument(tiny_tod, tiny_split, tmp_path, alpha) -> None:
    path = tiny_tod(head="dense", batch_size=4)
    with pytest.raises(UserError, match="mixup must be a number in"):
        Trainer(TrainSession.create(path), tiny_split(8), mixup=alpha)
    if isinstance(alpha, float) and not np.isfinite(alpha):
        return  # a file cannot hold it: the format writes JSON without NaN or infinity
    with pytest.raises(ModelError, match="mixup must be a number in"):
        TrainSession.create(_with_mixup(path, alpha, tmp_path / "bad.tod"))
