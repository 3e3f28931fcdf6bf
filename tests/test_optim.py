"""Optimizers against torch.optim: 100 steps on the same data track torch within 1e-4; gradients
accumulated over K batches of B make the step one batch of K*B makes; the table and its settings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgetune.errors import UserError
from edgetune.runtime.head import head_graph
from edgetune.runtime.module import Module
from edgetune.runtime.ops import Parameter
from edgetune.runtime.optim import (BLOCKS_PER_THREAD, OPTIMIZERS, SGD, UPDATE_BLOCK, Adam, AdamW, Algorithm,
                                    Optimizer, TrainingDiverged, make_optimizer)

TORCH_SGD = {"momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False}  # torch's defaults
TORCH_ADAM = {"betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}
SETTINGS = {
    "sgd_plain": {"name": "sgd", **TORCH_SGD, "lr": 0.1},
    "sgd_seed": {"name": "sgd", **TORCH_SGD, "lr": 0.0015 * 20, "momentum": 0.9, "dampening": 0.01},
    "sgd_weight_decay": {"name": "sgd", **TORCH_SGD, "lr": 0.05, "momentum": 0.5, "dampening": 0.3,
                         "weight_decay": 0.01},
    "sgd_nesterov": {"name": "sgd", **TORCH_SGD, "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.001},
    "adam": {"name": "adam", **TORCH_ADAM, "lr": 0.01},
    "adam_weight_decay": {"name": "adam", "lr": 0.003, "betas": [0.8, 0.99], "eps": 1e-6, "weight_decay": 0.05},
    "adamw": {"name": "adamw", **TORCH_ADAM, "lr": 0.01, "weight_decay": 0.01},
    "adamw_strong_decay": {"name": "adamw", "lr": 0.003, "betas": [0.8, 0.99], "eps": 1e-6, "weight_decay": 0.5},
}
TORCH_CLASSES = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
HEADS = {
    "dense": [{"op": "dense", "weight": "w0", "bias": "b0"}],
    "dense_relu_dense": [{"op": "dense", "weight": "w0", "bias": "b0"}, {"op": "relu"},
                         {"op": "dense", "weight": "w1", "bias": None}],
}


def torch_optimizer(cfg, params):
    kw = {k: v for k, v in cfg.items() if k != "name"}
    return TORCH_CLASSES[cfg["name"]](params, **kw)


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
    module = _module(spec, init)
    params = module.params
    opt = make_optimizer(cfg, module.parameters())

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
        loss = module(x, onehot)["loss"]
        opt.step()
        topt.zero_grad()
        tloss = torch.nn.functional.cross_entropy(tnet(torch.from_numpy(x)), torch.from_numpy(onehot))
        tloss.backward()
        topt.step()
        assert float(loss) == pytest.approx(tloss.item(), rel=1e-4, abs=1e-6)
    tparams = [tmods[0].weight, tmods[0].bias] + ([tmods[2].weight] if len(spec) > 1 else [])
    tol = 1e-5 if cfg["weight_decay"] else 1e-4  # issue 12: weight decay and AdamW within 1e-5
    for ours, ref in zip(params.values(), tparams):
        ref = ref.detach().numpy()
        np.testing.assert_allclose(ours.data, ref, rtol=tol, atol=tol * float(np.abs(ref).max()))
    assert opt.step_count == 100


def _module(spec, init: dict[str, np.ndarray]) -> Module:
    values = {k: np.asarray(v, np.float32) for k, v in init.items()}
    nodes, constants = head_graph(spec, "features", values)
    return Module(nodes, {k: Parameter(k, v) for k, v in values.items()}, "features", nodes[-1].outputs[0], constants)


def test_sgd_first_step_copies_the_gradient_then_dampens() -> None:
    p = Parameter("p", np.zeros(1))
    opt = Optimizer([p], SGD(lr=1.0, momentum=0.9, dampening=0.5))
    p.grad[:] = 2.0
    opt.step()  # buf = g = 2 (no dampening on the first step, as torch)
    assert p.data[0] == pytest.approx(-2.0)
    opt.step()  # buf = 0.9 * 2 + 0.5 * 2 = 2.8
    assert opt.state["p"]["momentum_buffer"][0] == pytest.approx(2.8)
    assert p.data[0] == pytest.approx(-4.8)


def test_resumed_optimizer_continues_like_an_uninterrupted_one() -> None:
    def run(split: bool) -> np.ndarray:
        p = Parameter("p", np.ones(3))
        opt = Optimizer([p], Adam(lr=0.1))
        grads = np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32)
        for i, g in enumerate(grads):
            if split and i == 3:
                saved, step = opt.state_tensors(), opt.step_count
                p = Parameter("p", p.data.copy())
                opt = Optimizer([p], Adam(lr=0.1), step_count=step)
                opt.load_state(saved)
            p.grad[:] = g
            opt.step()
        return p.data

    np.testing.assert_array_equal(run(False), run(True))


@pytest.mark.parametrize("cfg, message", [
    ({"name": "rmsprop", "lr": 0.1}, "unknown optimizer 'rmsprop'; known: .*'adam', 'adamw', 'sgd'"),
    ({"name": "sgd", **TORCH_SGD, "lr": 0.1, "nesterov": True}, "Nesterov"),
    ({"name": "sgd", **TORCH_SGD, "lr": float("nan")}, "sgd lr must be a finite number"),
    ({"name": "sgd", **TORCH_SGD, "lr": "fast"}, "sgd lr must be a finite number"),
    ({"name": "sgd", **TORCH_SGD, "lr": 0.1, "nesterov": 1}, "nesterov must be true or false"),
    ({"name": "adam", **TORCH_ADAM, "lr": 0.1, "momentum": 0.9}, r"bad adam settings .*unknown \['momentum'\]"),
    ({"name": "adam", "lr": 0.1}, r"bad adam settings .*missing \['betas', 'eps', 'weight_decay'\]"),
    ({"name": "adam", **TORCH_ADAM, "lr": 0.1, "betas": [0.9, 1.5]}, r"betas must be two numbers in \[0, 1\)"),
    ({"name": "adam", **TORCH_ADAM, "lr": 0.1, "eps": 0}, "eps must be > 0"),
])
def test_bad_optimizer_settings(cfg, message: str) -> None:
    with pytest.raises(UserError, match=message):
        make_optimizer(cfg, [Parameter("p", np.zeros(2))])


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_each_entry_round_trips_through_meta(name: str) -> None:
    """The host writes `to_meta`, the device reads `from_meta`: the same settings, every one written."""
    entry = OPTIMIZERS[name]()
    meta = entry.to_meta()
    assert meta["name"] == name and Algorithm.from_meta(meta) == entry
    assert list(meta) == ["name", *entry.settings()]
    assert Algorithm.from_meta({**meta, "lr": 0.5}).lr == 0.5


def test_seed_defaults_are_the_export_defaults() -> None:
    assert SGD().to_meta() == {"name": "sgd", "lr": 0.0015, "momentum": 0.9, "dampening": 0.01, "weight_decay": 0.0,
                               "nesterov": False}
    assert Adam().to_meta() == {"name": "adam", "lr": 0.001, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}
    assert AdamW().to_meta() == {"name": "adamw", "lr": 0.001, "betas": [0.9, 0.999], "eps": 1e-8,
                                 "weight_decay": 0.01}  # torch.optim.AdamW's defaults


VIRTUAL = {"sgd_momentum_decay": {"name": "sgd", **TORCH_SGD, "lr": 0.05, "momentum": 0.9, "dampening": 0.1,
                                  "weight_decay": 0.01},
           "adam": {"name": "adam", "lr": 0.01, "betas": [0.9, 0.99], "eps": 1e-8, "weight_decay": 0.01},
           "adamw": {"name": "adamw", "lr": 0.01, "betas": [0.9, 0.99], "eps": 1e-8, "weight_decay": 0.1}}


@pytest.mark.parametrize("setting", sorted(VIRTUAL))
@pytest.mark.parametrize("k, b", [(4, 8), (3, 5)])
def test_k_accumulated_batches_of_b_equal_one_batch_of_k_times_b(setting: str, k: int, b: int) -> None:
    """MindSpore's virtual batch: zero_grad, K forward/backward passes with grad_scale=1/K, one step.

    The loss is a batch mean, so each of the K batch gradients is scaled by 1/K: their sum is then the
    gradient of the mean over all K*B samples, and the step is the one a single K*B batch makes, for any
    optimizer (unlike dividing the learning rate by K, which is right for plain SGD only). Equal up to
    float32 rounding (the sums run in another order): 1e-5 relative, over 5 steps with a dropout-free MLP.
    """
    spec = [{"op": "dense", "weight": "w0", "bias": "b0"}, {"op": "relu"},
            {"op": "dense", "weight": "w1", "bias": "b1"}]
    rng = np.random.default_rng(7)
    init = {"w0": rng.normal(0, 0.3, (6, 10)), "b0": rng.normal(0, 0.1, (6,)), "w1": rng.normal(0, 0.3, (4, 6)),
            "b1": np.zeros(4)}
    accumulated, whole = _module(spec, init), _module(spec, init)
    opt_acc = make_optimizer(VIRTUAL[setting], accumulated.parameters())
    opt_whole = make_optimizer(VIRTUAL[setting], whole.parameters())
    for _ in range(5):
        x = rng.normal(0, 1, (k * b, 10)).astype(np.float32)
        y = np.eye(4, dtype=np.float32)[rng.integers(0, 4, k * b)]
        opt_acc.zero_grad()
        losses = [float(accumulated(x[i * b:(i + 1) * b], y[i * b:(i + 1) * b], grad_scale=1 / k)["loss"])
                  for i in range(k)]
        opt_whole.zero_grad()
        loss = float(whole(x, y)["loss"])
        assert np.mean(losses) == pytest.approx(loss, rel=1e-5)  # the mean of the K means is the mean of all
        for name, p in whole.params.items():
            np.testing.assert_allclose(accumulated.params[name].grad, p.grad, rtol=1e-5, atol=1e-7)
        opt_acc.step()
        opt_whole.step()
    for name, p in whole.params.items():
        np.testing.assert_allclose(accumulated.params[name].data, p.data, rtol=1e-5, atol=1e-6)
    assert opt_acc.step_count == opt_whole.step_count == 5


def test_gradients_can_be_inspected_and_a_bad_step_is_refused_untouched() -> None:
    p = Parameter("p", np.ones(3))
    opt = Optimizer([p], SGD(lr=0.1))
    p.grad[:] = [1.0, np.inf, 0.0]
    with pytest.raises(TrainingDiverged, match="step 1: a gradient is not finite"):
        opt.step()
    assert opt.step_count == 0 and np.array_equal(p.data, np.ones(3))
    opt.zero_grad()
    assert not p.grad.any()


@pytest.mark.parametrize("setting", ["sgd_seed", "adam", "adamw_strong_decay"])
def test_parameter_groups_track_torch_param_groups(setting: str) -> None:
    """`meta["param_groups"]`: each group trains at lr * lr_scale, as torch with one group per scale."""
    cfg = SETTINGS[setting]
    groups = [{"name": "head", "params": ["w1"], "lr_scale": 1.0},
              {"name": "backbone", "params": ["w0", "b0"], "lr_scale": 0.1}]
    rng = np.random.default_rng(5)
    init = {"w0": rng.normal(0, 0.3, (6, 10)), "b0": rng.normal(0, 0.1, (6,)), "w1": rng.normal(0, 0.3, (4, 6))}
    module = _module(HEADS["dense_relu_dense"], init)
    opt = make_optimizer(cfg, module.parameters(), param_groups=groups)
    tnet = torch.nn.Sequential(torch.nn.Linear(10, 6), torch.nn.ReLU(), torch.nn.Linear(6, 4, bias=False))
    with torch.no_grad():
        tnet[0].weight.copy_(torch.from_numpy(module.params["w0"].data))
        tnet[0].bias.copy_(torch.from_numpy(module.params["b0"].data))
        tnet[2].weight.copy_(torch.from_numpy(module.params["w1"].data))
    kw = {k: v for k, v in cfg.items() if k != "name"}
    topt = TORCH_CLASSES[cfg["name"]]([{"params": [tnet[2].weight]},
                                       {"params": [tnet[0].weight, tnet[0].bias], "lr": cfg["lr"] * 0.1}], **kw)
    for _ in range(50):
        y = rng.integers(0, 4, 8)
        x = rng.normal(0, 1, (8, 10)).astype(np.float32)
        onehot = np.eye(4, dtype=np.float32)[y]
        opt.zero_grad()
        module(x, onehot)
        opt.step()
        topt.zero_grad()
        torch.nn.functional.cross_entropy(tnet(torch.from_numpy(x)), torch.from_numpy(onehot)).backward()
        topt.step()
    for name, ref in (("w0", tnet[0].weight), ("b0", tnet[0].bias), ("w1", tnet[2].weight)):
        ref = ref.detach().numpy()
        np.testing.assert_allclose(module.params[name].data, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))


def test_parameter_groups_are_checked() -> None:
    params = [Parameter("a", np.zeros(2)), Parameter("b", np.zeros(2))]
    assert Optimizer(params, SGD(), lr_scales={"a": 0.5}).lr_scales == {"a": 0.5, "b": 1.0}
    for groups, match in [([{"params": ["a"], "lr_scale": -1}], "lr_scale >= 0"),
                          ([{"params": ["zz"], "lr_scale": 1}], "not a trainable parameter"),
                          ([{"params": ["a"], "lr_scale": 1}, {"params": ["a"], "lr_scale": 2}], "two parameter groups"),
                          ({"params": ["a"]}, "must be a list")]:
        with pytest.raises(UserError, match=match):
            make_optimizer(SETTINGS["adam"], params, param_groups=groups)


@pytest.mark.parametrize("setting", ["sgd_seed", "sgd_nesterov", "adam_weight_decay", "adamw"])
def test_a_parameter_larger_than_a_block_is_updated_as_torch_updates_it(setting: str) -> None:
    """The update runs on blocks of `UPDATE_BLOCK` elements; across block edges it is still torch's."""
    cfg = SETTINGS[setting]
    rng = np.random.default_rng(2)
    shape = (3, UPDATE_BLOCK + 7)  # a row spans a block edge; 3 blocks and a tail
    p = Parameter("w", rng.normal(0, 1, shape))
    opt = make_optimizer(cfg, [p])
    t = torch.nn.Parameter(torch.from_numpy(p.data.copy()))
    topt = torch_optimizer(cfg, [t])
    for _ in range(5):
        g = rng.normal(0, 1, shape).astype(np.float32)
        p.grad[...] = g
        t.grad = torch.from_numpy(g.copy())
        opt.step()
        topt.step()
    np.testing.assert_allclose(p.data, t.detach().numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("setting", ["sgd_seed", "sgd_nesterov", "adam_weight_decay", "adamw"])
def test_updates_on_several_threads_are_the_same_bits_as_on_one(setting: str) -> None:
    """Blocks w, w + T, ... on thread w: every rule is element-wise, so any thread count gives the same bits."""
    shapes = [(BLOCKS_PER_THREAD * 6, UPDATE_BLOCK // 2 + 5), (7,)]  # 13 blocks (3 threads' worth), a tiny one
    runs = []
    for threads in (1, 2, 3):
        params = [Parameter(f"p{i}", np.random.default_rng(i).normal(0, 1, shape)) for i, shape in enumerate(shapes)]
        opt = make_optimizer(SETTINGS[setting], params, param_groups=[{"name": "g", "params": ["p1"], "lr_scale": 0.1}],
                             threads=threads)
        grads = np.random.default_rng(9)
        for _ in range(3):
            for p in params:
                p.grad[...] = grads.normal(0, 1, p.data.shape)
            opt.step()
        runs.append([p.data.copy() for p in params] + list(opt.state_tensors().values()))
    for run in runs[1:]:
        for got, want in zip(run, runs[0], strict=True):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("threads", [1, 2])
def test_an_update_that_overflows_in_its_last_block_undoes_every_block(threads: int) -> None:
    """Also when the blocks run on two threads: the other thread's blocks are undone too."""
    p = Parameter("w", np.ones(2 * BLOCKS_PER_THREAD * UPDATE_BLOCK + 3))
    q = Parameter("b", np.ones(4))
    opt = Optimizer([q, p], SGD(lr=1.0, momentum=0.9), threads=threads)
    q.grad[:], p.grad[:] = 1.0, 0.5
    opt.step()
    p.data[-1] = -3e38
    p.grad[-1] = 3e38  # -3e38 - 1.0 * (0.9 buf + 0.99 * 3e38) overflows float32, in the last block only
    before = (q.data.copy(), p.data.copy(), {k: v.copy() for k, v in opt.state_tensors().items()})
    with pytest.raises(TrainingDiverged, match="step 2: the update made a weight non-finite"):
        opt.step()
    np.testing.assert_array_equal(q.data, before[0])
    np.testing.assert_array_equal(p.data, before[1])
    for k, v in opt.state_tensors().items():
        np.testing.assert_array_equal(v, before[2][k])
    assert opt.step_count == 1
