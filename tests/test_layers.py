"""The numpy head against torch: forward, loss and one step's gradients within 1e-5 relative."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgetune.runtime.layers import (Dense, Dropout, Flatten, Identity, Parameter, ReLU, Sequential,
                                     SoftmaxCrossEntropy, build_head)

RTOL = 1e-5


def assert_close(ours: np.ndarray, ref: torch.Tensor, rtol: float = RTOL) -> None:
    ref = ref.detach().numpy()
    np.testing.assert_allclose(ours, ref, rtol=rtol, atol=rtol * float(np.abs(ref).max() + 1e-12))


def one_hot(labels: np.ndarray, c: int) -> np.ndarray:
    out = np.zeros((len(labels), c), np.float32)
    out[np.arange(len(labels)), labels] = 1
    return out


SPECS = {
    "dense": [{"op": "dense", "weight": "w0", "bias": "b0"}],
    "dense_nobias": [{"op": "dense", "weight": "w0", "bias": None}],
    "dense_relu_dense": [{"op": "dense", "weight": "w0", "bias": "b0"}, {"op": "relu"},
                         {"op": "dense", "weight": "w1", "bias": "b1"}],
    "mlp_dropout_flatten": [{"op": "identity"}, {"op": "dense", "weight": "w0", "bias": "b0"}, {"op": "relu"},
                            {"op": "dropout", "p": 0.3}, {"op": "flatten"},
                            {"op": "dense", "weight": "w1", "bias": "b1"}],
}


def make_params(spec, n_in: int, c: int, rng: np.random.Generator) -> dict[str, Parameter]:
    dense = [op for op in spec if op["op"] == "dense"]
    widths = [n_in] + [7] * (len(dense) - 1) + [c]
    params = {}
    for i, op in enumerate(dense):
        params[op["weight"]] = Parameter(op["weight"], rng.normal(0, 0.4, (widths[i + 1], widths[i])))
        if op["bias"]:
            params[op["bias"]] = Parameter(op["bias"], rng.normal(0, 0.1, (widths[i + 1],)))
    return params


def torch_forward(spec, params: dict[str, Parameter], head: Sequential, x: torch.Tensor):
    """The same head in torch ops; dropout reuses the numpy layer's mask so both see the same noise."""
    tparams = {n: torch.tensor(p.data, requires_grad=True) for n, p in params.items()}
    for op, layer in zip(spec, head.layers):
        if op["op"] == "dense":
            b = tparams[op["bias"]] if op["bias"] else None
            x = torch.nn.functional.linear(x, tparams[op["weight"]], b)
        elif op["op"] == "relu":
            x = torch.relu(x)
        elif op["op"] == "dropout":
            x = x * torch.from_numpy(layer._mask)
        elif op["op"] == "flatten":
            x = torch.flatten(x, 1)
    return x, tparams


@pytest.mark.parametrize("spec_name", sorted(SPECS))
@pytest.mark.parametrize("soft", [False, True])
def test_one_step_gradients_match_torch(spec_name: str, soft: bool) -> None:
    spec = SPECS[spec_name]
    rng = np.random.default_rng(3)
    n, f, c = 16, 12, 5
    params = make_params(spec, f, c, rng)
    head = build_head(spec, params, np.random.default_rng(0))
    x = rng.normal(0, 1, (n, f)).astype(np.float32)
    labels = rng.dirichlet(np.ones(c), n).astype(np.float32) if soft else one_hot(rng.integers(0, c, n), c)

    loss_fn = SoftmaxCrossEntropy()
    logits = head(x)
    loss = loss_fn.forward(logits, labels)
    dx = head.backward(loss_fn.backward())

    tx = torch.tensor(x, requires_grad=True)
    tlogits, tparams = torch_forward(spec, params, head, tx)
    tloss = torch.nn.functional.cross_entropy(tlogits, torch.from_numpy(labels))  # mean, probability targets
    tloss.backward()
    assert_close(logits, tlogits)
    assert_close(np.asarray(loss), tloss)
    assert_close(dx, tx.grad)
    for name, p in params.items():
        assert_close(p.grad, tparams[name].grad)


def test_zero_grad_and_accumulation() -> None:
    rng = np.random.default_rng(0)
    w = Parameter("w", rng.normal(size=(3, 4)))
    layer = Dense(w, None)
    x = rng.normal(size=(2, 4)).astype(np.float32)
    g = np.ones((2, 3), np.float32)
    layer(x)
    layer.backward(g)
    once = w.grad.copy()
    layer.backward(g)
    np.testing.assert_allclose(w.grad, 2 * once, rtol=1e-6)
    layer.zero_grad()
    assert not w.grad.any()
    np.testing.assert_allclose(once, g.T @ x, rtol=1e-6)


def test_dropout_scales_kept_units_and_is_identity_in_eval() -> None:
    layer = Dropout(0.25, np.random.default_rng(0))
    x = np.ones((200, 50), np.float32)
    y = layer(x)
    kept = y != 0
    assert abs(kept.mean() - 0.75) < 0.02  # 10000 draws: 3 sigma ~ 0.013
    np.testing.assert_array_equal(y[kept], np.float32(1 / 0.75))
    np.testing.assert_array_equal(layer.backward(x), y)
    layer.training = False
    np.testing.assert_array_equal(layer(x), x)
    np.testing.assert_array_equal(layer.backward(x), x)


def test_dropout_masks_follow_the_generator_state() -> None:
    a, b = np.random.default_rng(5), np.random.default_rng(5)
    x = np.ones((4, 9), np.float32)
    np.testing.assert_array_equal(Dropout(0.5, a)(x), Dropout(0.5, b)(x))


def test_flatten_identity_relu_shapes() -> None:
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4) - 10
    fl = Flatten()
    assert fl(x).shape == (2, 12)
    assert fl.backward(np.ones((2, 12), np.float32)).shape == (2, 3, 4)
    np.testing.assert_array_equal(Identity()(x), x)
    relu = ReLU()
    np.testing.assert_array_equal(relu(x), np.maximum(x, 0))
    np.testing.assert_array_equal(relu.backward(np.ones_like(x)), (x > 0).astype(np.float32))


def test_loss_is_stable_for_large_logits() -> None:
    logits = np.array([[1000.0, 0.0, -1000.0]], np.float32)
    loss = SoftmaxCrossEntropy().forward(logits, np.array([[0, 0, 1]], np.float32))
    assert loss == pytest.approx(2000.0, rel=1e-6)


def test_repr_shows_structure() -> None:
    rng = np.random.default_rng(0)
    params = make_params(SPECS["mlp_dropout_flatten"], 12, 5, rng)
    head = build_head(SPECS["mlp_dropout_flatten"], params, rng)
    assert repr(head) == ("Sequential(Identity(), Dense(12 -> 7, bias=True), ReLU(), Dropout(p=0.3), Flatten(), "
                          "Dense(7 -> 5, bias=True))")
    assert [p.name for p in head.parameters()] == ["w0", "b0", "w1", "b1"]


@pytest.mark.parametrize("spec, message", [
    ([{"op": "conv"}], "unknown op 'conv'"),
    ([{"op": "dense", "weight": "nope", "bias": None}], "does not have"),
    ([{"op": "dropout", "p": 1.0}], "dropout p"),
])
def test_build_head_rejects_bad_specs(spec, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_head(spec, {}, np.random.default_rng(0))
