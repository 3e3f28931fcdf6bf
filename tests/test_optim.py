"""Optimizers against torch.optim: 100 steps on the same data track torch within 1e-4."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgetune.runtime.layers import Parameter, SoftmaxCrossEntropy, build_head
from edgetune.runtime.optim import SGD, Adam, make_optimizer

SETTINGS = {
    "sgd_plain": {"name": "sgd", "lr": 0.1},
    "sgd_seed": {"name": "sgd", "lr": 0.0015 * 20, "momentum": 0.9, "dampening": 0.01},
    "sgd_weight_decay": {"name": "sgd", "lr": 0.05, "momentum": 0.5, "dampening": 0.3, "weight_decay": 0.01},
    "sgd_nesterov": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.001},
    "adam": {"name": "adam", "lr": 0.01},
    "adam_weight_decay": {"name": "adam", "lr": 0.003, "betas": [0.8, 0.99], "eps": 1e-6, "weight_decay": 0.05},
}
HEADS = {
    "dense": [{"op": "dense", "weight": "w0", "bias": "b0"}],
    "dense_relu_dense": [{"op": "dense", "weight": "w0", "bias": "b0"}, {"op": "relu"},
                         {"op": "dense", "weight": "w1", "bias": None}],
}


def torch_optimizer(cfg, params):
    kw = {k: v for k, v in cfg.items() if k != "name"}
    return (torch.optim.SGD if cfg["name"] == "sgd" else torch.optim.Adam)(params, **kw)


@pytest.mark.parametrize("head_name", sorted(HEADS))
@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_100_steps_track_torch(setting: str, head_name: str) -> None:
    cfg, spec = SETTINGS[setting], HEADS[head_name]
    rng = np.random.default_rng(11)
    f, c, n = 10, 4, 8
    hidden = 6 if len(spec) > 1 else c
    init = {"w0": rng.normal(0, 0.3, (hidden, f)), "b0": rng.normal(0, 0.1, (hidden,))}
    if len(spec) > 1:
        init["w1"] = rng.normal(0, 0.3, (c, 6))
    params = {k: Parameter(k, v) for k, v in init.items()}
    head = build_head(spec, params, rng)
    opt = make_optimizer(cfg, list(params.values()))
    loss_fn = SoftmaxCrossEntropy()

    tmods = [torch.nn.Linear(f, init["w0"].shape[0])]
    if len(spec) > 1:
        tmods += [torch.nn.ReLU(), torch.nn.Linear(6, c, bias=False)]
    tnet = torch.nn.Sequential(*tmods)
    with torch.no_grad():
        tmods[0].weight.copy_(torch.from_numpy(params["w0"].data))
        tmods[0].bias.copy_(torch.from_numpy(params["b0"].data))
        if len(spec) > 1:
            tmods[2].weight.copy_(torch.from_numpy(params["w1"].data))
    topt = torch_optimizer(cfg, tnet.parameters())

    centers = rng.normal(0, 1.5, (c, f))
    for _ in range(100):
        y = rng.integers(0, c, n)
        x = (centers[y] + rng.normal(0, 1, (n, f))).astype(np.float32)
        onehot = np.eye(c, dtype=np.float32)[y]
        opt.zero_grad()
        loss = loss_fn.forward(head(x), onehot)
        head.backward(loss_fn.backward())
        opt.step()
        topt.zero_grad()
        tloss = torch.nn.functional.cross_entropy(tnet(torch.from_numpy(x)), torch.from_numpy(onehot))
        tloss.backward()
        topt.step()
        assert float(loss) == pytest.approx(tloss.item(), rel=1e-4, abs=1e-6)
    tparams = [tmods[0].weight, tmods[0].bias] + ([tmods[2].weight] if len(spec) > 1 else [])
    for ours, ref in zip(params.values(), tparams):
        ref = ref.detach().numpy()
        np.testing.assert_allclose(ours.data, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))
    assert opt.step_count == 100


def test_sgd_first_step_copies_the_gradient_then_dampens() -> None:
    p = Parameter("p", np.zeros(1))
    opt = SGD([p], lr=1.0, momentum=0.9, dampening=0.5)
    p.grad[:] = 2.0
    opt.step()  # buf = g = 2 (no dampening on the first step, as torch)
    assert p.data[0] == pytest.approx(-2.0)
    opt.step()  # buf = 0.9 * 2 + 0.5 * 2 = 2.8
    assert opt.state["p"]["momentum_buffer"][0] == pytest.approx(2.8)
    assert p.data[0] == pytest.approx(-4.8)


def test_resumed_optimizer_continues_like_an_uninterrupted_one() -> None:
    def run(split: bool) -> np.ndarray:
        p = Parameter("p", np.ones(3))
        opt = Adam([p], lr=0.1)
        grads = np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32)
        for i, g in enumerate(grads):
            if split and i == 3:
                saved, step = opt.state_tensors(), opt.step_count
                p = Parameter("p", p.data.copy())
                opt = Adam([p], lr=0.1, step_count=step)
                opt.load_state(saved)
            p.grad[:] = g
            opt.step()
        return p.data

    np.testing.assert_array_equal(run(False), run(True))


@pytest.mark.parametrize("cfg, message", [
    ({"name": "rmsprop", "lr": 0.1}, "unknown optimizer 'rmsprop'"),
    ({"name": "sgd", "lr": 0.1, "nesterov": True}, "Nesterov"),
    ({"name": "sgd", "lr": float("nan")}, "learning rate"),
    ({"name": "adam", "lr": 0.1, "momentum": 0.9}, "bad adam settings"),
])
def test_bad_optimizer_settings(cfg, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_optimizer(cfg, [Parameter("p", np.zeros(2))])
