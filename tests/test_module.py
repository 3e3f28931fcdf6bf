"""The trainable module against torch: each op's forward and backward, the loss, and the graph engine
(topological order, summed gradients of a tensor read twice, no gradient for the cut), within 1e-5."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from edgetune.runtime import blas
from edgetune.runtime.head import head_graph
from edgetune.runtime.module import Module, Node
from edgetune.runtime.ops import OPS, LOSSES, Op, Parameter, UnknownOp, get_op, register_op
from edgetune.runtime.ops.loss import SoftmaxCrossEntropy

RTOL = 1e-5


def assert_close(ours: np.ndarray, ref: torch.Tensor, rtol: float = RTOL) -> None:
    ref = ref.detach().numpy()
    np.testing.assert_allclose(ours, ref, rtol=rtol, atol=rtol * float(np.abs(ref).max() + 1e-12))


def one_hot(labels: np.ndarray, c: int) -> np.ndarray:
    return np.eye(c, dtype=np.float32)[labels]


SPECS = {
    "dense": [{"op": "dense", "weight": "w0", "bias": "b0"}],
    "dense_nobias": [{"op": "dense", "weight": "w0", "bias": None}],
    "dense_relu_dense": [{"op": "dense", "weight": "w0", "bias": "b0"}, {"op": "relu"},
                         {"op": "dense", "weight": "w1", "bias": "b1"}],
    "mlp_dropout_flatten": [{"op": "identity"}, {"op": "dense", "weight": "w0", "bias": "b0"}, {"op": "relu"},
                            {"op": "dropout", "p": 0.3}, {"op": "flatten"},
                            {"op": "dense", "weight": "w1", "bias": "b1"}],
}


def make_params(spec, n_in: int, c: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    dense = [op for op in spec if op["op"] == "dense"]
    widths = [n_in] + [7] * (len(dense) - 1) + [c]
    params = {}
    for i, op in enumerate(dense):
        params[op["weight"]] = rng.normal(0, 0.4, (widths[i + 1], widths[i])).astype(np.float32)
        if op["bias"]:
            params[op["bias"]] = rng.normal(0, 0.1, (widths[i + 1],)).astype(np.float32)
    return params


def head_module(spec, values: dict[str, np.ndarray], rng: np.random.Generator | None = None) -> Module:
    """A module from a `meta["head"]` list, as the session builds it."""
    nodes, constants = head_graph(spec, "features", values)
    return Module(nodes, {n: Parameter(n, v) for n, v in values.items()}, "features", nodes[-1].outputs[0],
                  constants, rng=rng)


def keep_dropout_masks(module: Module) -> dict[int, np.ndarray]:
    """Each Dropout op's mask of its next forward, by op id (the op itself forgets it after backward)."""
    masks: dict[int, np.ndarray] = {}
    for op in module.ops:
        if op.op_type == "Dropout":
            def forward(*args, _op=op, _forward=op.forward):
                y = _forward(*args)
                masks[id(_op)] = _op._mask
                return y
            op.forward = forward
    return masks


def torch_forward(spec, module: Module, x: torch.Tensor, masks: dict[int, np.ndarray]):
    """The same head in torch ops; dropout reuses the numpy op's mask so both see the same noise."""
    tparams = {n: torch.tensor(p.data, requires_grad=True) for n, p in module.params.items()}
    for item, op in zip(spec, module.ops):
        if item["op"] == "dense":
            b = tparams[item["bias"]] if item["bias"] else None
            x = torch.nn.functional.linear(x, tparams[item["weight"]], b)
        elif item["op"] == "relu":
            x = torch.relu(x)
        elif item["op"] == "dropout":
            x = x * torch.from_numpy(masks[id(op)])
        elif item["op"] == "flatten":
            x = torch.flatten(x, 1)
    return x, tparams


@pytest.mark.parametrize("spec_name", sorted(SPECS))
@pytest.mark.parametrize("soft", [False, True])
def test_one_step_gradients_match_torch(spec_name: str, soft: bool) -> None:
    spec = SPECS[spec_name]
    rng = np.random.default_rng(3)
    n, f, c = 16, 12, 5
    module = head_module(spec, make_params(spec, f, c, rng), np.random.default_rng(0))
    x = rng.normal(0, 1, (n, f)).astype(np.float32)
    labels = rng.dirichlet(np.ones(c), n).astype(np.float32) if soft else one_hot(rng.integers(0, c, n), c)

    masks = keep_dropout_masks(module)
    out = module(x, labels)

    tx = torch.tensor(x)
    tlogits, tparams = torch_forward(spec, module, tx, masks)
    tloss = torch.nn.functional.cross_entropy(tlogits, torch.from_numpy(labels))  # mean, probability targets
    tloss.backward()
    assert_close(out["logits"], tlogits)
    assert_close(out["loss"], tloss)
    for name, p in module.params.items():
        assert_close(p.grad, tparams[name].grad)


class Recording(Op):
    """Identity that records whether the engine asked it for its input's gradient."""

    calls: list = []

    def forward(self, x):
        return x

    def backward(self, grad):
        Recording.calls.append(self.needs_grad)
        return (grad if self.needs_grad[0] else None,)


def test_a_tensor_read_twice_gets_the_sum_of_both_gradients_and_the_cut_none() -> None:
    """A residual DAG, listed out of order: h = relu(x W0^T + b0); y = (h + h W1^T) W2^T. Against torch."""
    if "EdgetuneTestRecording" not in OPS:
        register_op("EdgetuneTestRecording")(Recording)
    rng = np.random.default_rng(5)
    values = {"w0": rng.normal(0, 0.5, (4, 6)), "b0": rng.normal(0, 0.1, (4,)), "w1": rng.normal(0, 0.5, (4, 4)),
              "w2": rng.normal(0, 0.5, (3, 4))}
    params = {n: Parameter(n, v) for n, v in values.items()}
    nodes = [Node("Gemm", ("h", "w2"), ("y",), {"transB": 1}, "out"),          # reads the sum
             Node("EdgetuneTestRecording", ("x",), ("xr",), {}, "rec"),
             Node("Relu", ("g",), ("h0",), {}, "relu"),
             Node("Gemm", ("xr", "w0", "b0"), ("g",), {"transB": 1}, "first"),
             Node("Gemm", ("h0", "w1"), ("r",), {"transB": 1}, "branch"),
             Node("EdgetuneAdd", ("h0", "r"), ("h",), {}, "residual")]
    if "EdgetuneAdd" not in OPS:
        @register_op("EdgetuneAdd")
        class _Add(Op):
            def forward(self, a, b):
                return a + b

            def backward(self, grad):
                return grad, grad

    module = Module(nodes, params, "x", "y")
    assert [n.name for n in module.nodes] == ["rec", "first", "relu", "branch", "residual", "out"]
    x = rng.normal(0, 1, (5, 6)).astype(np.float32)
    y = one_hot(rng.integers(0, 3, 5), 3)
    Recording.calls.clear()
    out = module(x, y)
    assert Recording.calls == []  # the cut (and what only depends on it) is never differentiated

    t = {n: torch.tensor(v.data, requires_grad=True) for n, v in params.items()}
    h0 = torch.relu(torch.from_numpy(x) @ t["w0"].T + t["b0"])
    logits = (h0 + h0 @ t["w1"].T) @ t["w2"].T
    torch.nn.functional.cross_entropy(logits, torch.from_numpy(y)).backward()
    assert_close(out["logits"], logits)
    for name, p in params.items():
        assert_close(p.grad, t[name].grad)


def test_gradients_accumulate_until_zero_grad() -> None:
    rng = np.random.default_rng(0)
    module = head_module(SPECS["dense_nobias"], {"w0": rng.normal(size=(3, 4)).astype(np.float32)})
    x, y = rng.normal(size=(2, 4)).astype(np.float32), one_hot(np.array([0, 2]), 3)
    module(x, y)
    once = module.params["w0"].grad.copy()
    module(x, y)
    np.testing.assert_allclose(module.params["w0"].grad, 2 * once, rtol=1e-6)
    module.zero_grad()
    assert not module.params["w0"].grad.any()
    module.eval()(x, y)
    assert not module.params["w0"].grad.any()  # eval mode: forward and loss only


@pytest.mark.parametrize("op_type, attrs, inputs, torch_fn", [
    ("Gemm", {}, [(5, 4), (4, 3), (3,)], lambda a, b, c: a @ b + c),
    ("Gemm", {"transB": 1}, [(5, 4), (3, 4), (1, 3)], lambda a, b, c: a @ b.T + c),
    ("MatMul", {}, [(5, 4), (4, 3)], lambda a, b: a @ b),
    ("Relu", {}, [(5, 4)], torch.relu),
    ("Flatten", {}, [(2, 3, 4)], lambda a: torch.flatten(a, 1)),
    ("Flatten", {"axis": 2}, [(2, 3, 4)], lambda a: a.reshape(6, 4)),
    ("Identity", {}, [(2, 3)], lambda a: a),
])
def test_each_op_forward_and_backward_match_torch(op_type, attrs, inputs, torch_fn) -> None:
    rng = np.random.default_rng(1)
    arrays = [rng.normal(0, 1, shape).astype(np.float32) for shape in inputs]
    op = get_op(op_type)(**attrs)
    out = op.forward(*arrays)
    grad = rng.normal(0, 1, out.shape).astype(np.float32)
    grads = op.backward(grad)
    tensors = [torch.tensor(a, requires_grad=True) for a in arrays]
    ref = torch_fn(*tensors)
    ref.backward(torch.from_numpy(grad))
    assert_close(out, ref)
    for g, t in zip(grads, tensors):
        assert_close(g, t.grad)


def test_reshape_takes_its_shape_as_a_constant_input() -> None:
    op = get_op("Reshape")()
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    assert op.forward(x, np.array([0, -1])).shape == (2, 12)  # 0 copies the input's size
    dx, dshape = op.backward(np.ones((2, 12), np.float32))
    assert dx.shape == (2, 3, 4) and dshape is None


def test_dropout_scales_kept_units_and_is_identity_in_eval() -> None:
    op = get_op("Dropout")()
    op.rng = np.random.default_rng(0)
    x = np.ones((200, 50), np.float32)
    y = op.forward(x, np.float64(0.25))
    kept = y != 0
    assert abs(kept.mean() - 0.75) < 0.02  # 10000 draws: 3 sigma ~ 0.013
    np.testing.assert_array_equal(y[kept], np.float32(1 / 0.75))
    np.testing.assert_array_equal(op.backward(x)[0], y)
    op.training = False
    np.testing.assert_array_equal(op.forward(x, np.float64(0.25)), x)
    np.testing.assert_array_equal(op.backward(x)[0], x)


def test_dropout_masks_follow_the_module_generator() -> None:
    spec = [{"op": "dropout", "p": 0.5}, {"op": "dense", "weight": "w", "bias": None}]
    values = {"w": np.eye(9, dtype=np.float32)}
    a = head_module(spec, values, np.random.default_rng(5)).forward(np.ones((4, 9), np.float32))
    b = head_module(spec, values, np.random.default_rng(5)).forward(np.ones((4, 9), np.float32))
    np.testing.assert_array_equal(a, b)
    assert (a == 0).any()


def test_loss_is_stable_for_large_logits_and_scales_its_gradient() -> None:
    loss = SoftmaxCrossEntropy()
    logits = np.array([[1000.0, 0.0, -1000.0]], np.float32)
    assert loss.forward(logits, np.array([[0, 0, 1]], np.float32)) == pytest.approx(2000.0, rel=1e-6)
    full, _ = loss.backward()
    np.testing.assert_array_equal(loss.backward(0.25)[0], full * np.float32(0.25))
    assert sorted(LOSSES) == ["softmax_cross_entropy"]


def test_repr_shows_structure() -> None:
    spec = SPECS["mlp_dropout_flatten"]
    module = head_module(spec, make_params(spec, 12, 5, np.random.default_rng(0)))
    assert repr(module) == ("Module(features -> Identity() -> Gemm(transB=1) -> Relu() -> Dropout() -> Flatten() -> "
                            "Gemm(transB=1) -> logits; parameters w0(7, 12), b0(7,), w1(5, 7), b1(5,))")
    assert [p.name for p in module.parameters()] == ["w0", "b0", "w1", "b1"]
    assert module.eval() is module and not module.training and module.train().training


def test_check_names_the_node_whose_shapes_do_not_fit() -> None:
    spec = SPECS["dense_relu_dense"]
    values = make_params(spec, 12, 5, np.random.default_rng(0))
    values["w1"] = np.zeros((5, 6), np.float32)  # takes 6, the layer before gives 7
    module = head_module(spec, values)
    with pytest.raises(ValueError, match=r"node 'head/2' \(Gemm\(transB=1\)\)"):
        module.check(12, 5)
    values["w1"], values["b1"] = np.zeros((4, 7), np.float32), np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="not num_classes=5"):
        head_module(spec, values).check(12, 5)


@pytest.mark.parametrize("spec, message", [
    ([{"op": "conv"}], "unknown op 'conv'"),
    ([{"op": "dense", "weight": "nope", "bias": None}], "does not have"),
    ([{"op": "dropout", "p": 1.0}], "dropout p"),
    ([{"op": "dense", "weight": "w3", "bias": None}], "must be 2-D"),
    ([], "no layers"),
])
def test_head_graph_rejects_bad_specs(spec, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        head_graph(spec, "features", {"w3": np.zeros((2, 2, 2), np.float32)})


@pytest.mark.parametrize("nodes, message", [
    ([Node("Tanh", ("x",), ("y",))], "Tanh"),
    ([Node("Gemm", ("x", "w"), ("y",), {"alpha": 2.0})], "only alpha=1"),
    ([Node("Relu", ("x",), ("y",), {"bogus": 1})], "unsupported attributes"),
    ([Node("Relu", ("nowhere",), ("y",))], "reads 'nowhere'"),
    ([Node("Relu", ("x",), ("y",)), Node("Relu", ("x",), ("y",))], "written twice"),
    ([Node("Relu", ("z",), ("y",)), Node("Relu", ("y",), ("z",))], "cycle"),
    ([Node("Relu", ("x",), ("other",))], "no node computes the output 'y'"),
])
def test_bad_graphs_are_refused_by_name(nodes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Module(nodes, {"w": Parameter("w", np.ones((2, 2)))}, "x", "y")


def test_unknown_ops_list_the_known_ones_and_registering_twice_fails() -> None:
    with pytest.raises(UnknownOp, match="known: .*Gemm"):
        get_op("Softmax")
    with pytest.raises(ValueError, match="registered twice"):
        register_op("Relu")(type("Relu2", (Op,), {}))


@pytest.mark.parametrize("training", [True, False])
def test_ops_keep_no_activations_after_a_step_or_an_eval_pass(training: bool) -> None:
    """Only one pass's activations may be alive: a deeper trainable part holds tens of MB per tensor."""
    spec = SPECS[sorted(SPECS)[-1]]
    rng = np.random.default_rng(5)
    module = head_module(spec, make_params(spec, 12, 5, rng), np.random.default_rng(0)).train(training)
    x = rng.normal(0, 1, (8, 12)).astype(np.float32)
    first = module(x, one_hot(rng.integers(0, 5, 8), 5))["logits"]
    assert [op for op in module.ops if any(name.startswith("_") for name in vars(op))] == []
    if not training:
        np.testing.assert_array_equal(module(x)["logits"], first)  # an eval pass still computes the same


def conv_module(batch_statistics: bool = False, dropout: bool = False) -> Module:
    """A small deep trainable part, Lite0's kind: 1x1 conv, BN, ReLU6, depthwise 3x3 stride 2, pool, dense."""
    rng = np.random.default_rng(9)
    p = {"w1": rng.normal(0, 0.5, (6, 4, 1, 1)), "g": rng.uniform(0.5, 1.5, 6), "b": rng.normal(0, 0.1, 6),
         "dw": rng.normal(0, 0.5, (6, 1, 3, 3)), "fc": rng.normal(0, 0.5, (3, 6)), "fcb": np.zeros(3)}
    constants = {"mean": rng.normal(0, 0.1, 6).astype(np.float32), "var": rng.uniform(0.5, 2, 6).astype(np.float32),
                 "lo": np.float32(0), "hi": np.float32(6), "ratio": np.float32(0.3)}
    nodes = [Node("Conv", ("x", "w1"), ("c1",)),
             Node("BatchNormalization", ("c1", "g", "b", "mean", "var"), ("n1",), {"training_mode": int(batch_statistics)}),
             Node("Clip", ("n1", "lo", "hi"), ("r1",)),
             Node("Conv", ("r1", "dw"), ("c2",), {"group": 6, "kernel_shape": [3, 3], "pads": [1, 1, 1, 1],
                                                   "strides": [2, 2]}),
             Node("GlobalAveragePool", ("c2",), ("p",)),
             Node("Flatten", ("p",), ("f",))]
    if dropout:
        nodes.append(Node("Dropout", ("f", "ratio"), ("d",)))
    nodes.append(Node("Gemm", ("d" if dropout else "f", "fc", "fcb"), ("logits",), {"transB": 1}))
    params = {k: Parameter(k, v) for k, v in p.items()}
    return Module(nodes, params, "x", "logits", constants, rng=np.random.default_rng(3), input_shape=(4, 5, 5))


@pytest.mark.parametrize("dropout", [False, True])
def test_a_batch_above_max_pass_runs_in_passes_that_add_up_to_the_whole_batch(dropout: bool) -> None:
    """Passes of at most `max_pass` samples: the logits, the loss and the gradients of one pass over
    the batch (float32 rounding apart), and the same dropout masks (the generator is read in order)."""
    rng = np.random.default_rng(4)
    x = rng.normal(0, 1, (10, 100)).astype(np.float32)
    labels = one_hot(rng.integers(0, 3, 10), 3)
    whole, split = conv_module(dropout=dropout), conv_module(dropout=dropout)
    split.max_pass = 3  # passes of 2-3 samples: 4 passes
    sizes = []
    forward = split._forward
    split._forward = lambda ops, features: sizes.append(len(features)) or forward(ops, features)
    out_whole, out_split = whole(x, labels), split(x, labels)
    assert sizes == [2, 3, 2, 3]
    np.testing.assert_allclose(out_split["logits"], out_whole["logits"], rtol=1e-6, atol=1e-6)
    assert split.loss == pytest.approx(whole.loss, rel=1e-6)
    for name, p in whole.params.items():
        np.testing.assert_allclose(split.params[name].grad, p.grad, rtol=1e-5, atol=1e-6)
    split.eval(), whole.eval()
    np.testing.assert_allclose(split(x)["logits"], whole(x)["logits"], rtol=1e-6, atol=1e-6)


def test_passes_on_two_threads_add_up_to_the_whole_batch_and_repeat_bit_for_bit() -> None:
    """Passes on two threads at once (pass k on worker k % 2, each with its own op instances, numpy's
    BLAS on one thread meanwhile): the whole batch's logits, loss and gradients up to float32
    rounding, and the same bits on every run whichever thread finishes first."""
    rng = np.random.default_rng(4)
    x = rng.normal(0, 1, (10, 100)).astype(np.float32)
    labels = one_hot(rng.integers(0, 3, 10), 3)
    whole = conv_module()
    out_whole = whole(x, labels)
    seen: list[tuple[int, int, int | None]] = []  # (pass size, thread, BLAS threads) of every pass
    runs = []
    for _ in range(5):
        split = conv_module()
        split.max_pass, split.workers = 4, 2  # 3 passes of <= 4, made 4 (a multiple of the workers)
        forward = split._forward
        split._forward = lambda ops, f, forward=forward: seen.append(
            (len(f), threading.get_ident(), blas.threads())) or forward(ops, f)
        out = split(x, labels)
        np.testing.assert_allclose(out["logits"], out_whole["logits"], rtol=1e-6, atol=1e-6)
        assert split.loss == pytest.approx(whole.loss, rel=1e-6)
        for name, p in whole.params.items():
            np.testing.assert_allclose(split.params[name].grad, p.grad, rtol=1e-5, atol=1e-6)
        assert [op for op in split.ops if any(name.startswith("_") for name in vars(op))] == []
        runs.append((out["logits"], [p.grad.copy() for p in split.parameters()]))
    assert sorted(size for size, _, _ in seen[:4]) == [2, 2, 3, 3] and len(seen) == 20
    assert len({thread for _, thread, _ in seen}) >= 2  # the passes ran on more than one thread
    if blas.threads() is not None:
        assert {count for _, _, count in seen} == {1}
    for logits, grads in runs[1:]:
        np.testing.assert_array_equal(logits, runs[0][0])
        for g, g0 in zip(grads, runs[0][1]):
            np.testing.assert_array_equal(g, g0)


def fail_on_the_second_worker(module: Module) -> None:
    """Make every pass that runs on a worker other than the caller's thread raise a node's ValueError."""
    forward = module._forward

    def forward_or_fail(ops, features):
        if ops is not module.ops:
            raise ValueError("node 'x' cannot take {}")
        return forward(ops, features)

    module._forward = forward_or_fail


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_batch_statistics_train_on_the_whole_batch_however_the_budget_splits_it(workers: int) -> None:
    """A batch-statistics BatchNorm trains in one pass per thread, whatever `max_pass` says: the passes
    meet to share the batch's mean and variance (forward) and the two sums its input gradient needs
    (backward). Logits, loss, gradients and the running statistics equal one pass over the batch up to
    float32 rounding, and two runs give the same bits."""
    rng = np.random.default_rng(4)
    x = rng.normal(0, 1, (10, 100)).astype(np.float32)
    labels = one_hot(rng.integers(0, 3, 10), 3)
    whole = conv_module(batch_statistics=True)
    out_whole = whole(x, labels)
    runs = []
    for _ in range(2):
        split = conv_module(batch_statistics=True)
        split.check(100, 3)
        split.limit_activations(1, threads=workers)  # a budget of one byte: passes of one sample, were it not for BN
        sizes = []
        forward = split._forward
        split._forward = lambda ops, f, forward=forward: sizes.append(len(f)) or forward(ops, f)
        out = split(x, labels)
        assert sorted(sizes) == sorted(10 * k // workers - 10 * (k - 1) // workers for k in range(1, workers + 1))
        np.testing.assert_allclose(out["logits"], out_whole["logits"], rtol=1e-5, atol=1e-6)
        assert split.loss == pytest.approx(whole.loss, rel=1e-6)
        for name, p in whole.params.items():
            np.testing.assert_allclose(split.params[name].grad, p.grad, rtol=1e-5, atol=1e-6)
        for name in ("mean", "var"):
            np.testing.assert_allclose(split.constants[name], whole.constants[name], rtol=1e-6, atol=1e-7)
        assert all(op.peers is None for op in split.ops)
        runs.append([out["logits"], split.constants["mean"].copy()] + [p.grad.copy() for p in split.parameters()])
        split.eval()  # evaluation normalises with the running statistics: passes by the budget again
        sizes.clear()
        split(x)
        assert sizes == [1] * 10
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


def test_passes_that_meet_run_backward_only_when_every_pass_has_a_finite_loss() -> None:
    """One pass's loss is NaN: no pass runs backward (a lone backward would wait for the others to meet)."""
    module = conv_module(batch_statistics=True)
    module.check(100, 3)
    module.limit_activations(10**9, threads=2)
    labels = one_hot(np.zeros(4, int), 3)
    labels[3] = np.nan  # in the second pass only
    out = module(np.ones((4, 100), np.float32), labels)
    assert not np.isfinite(out["loss"])
    assert all(not p.grad.any() for p in module.parameters())


def test_a_failing_pass_stops_the_passes_that_wait_for_it_to_meet() -> None:
    """A pass that fails before a meeting aborts it: the other threads stop instead of waiting forever,
    and the caller gets the failure itself, not the others' broken meeting."""
    module = conv_module(batch_statistics=True)
    module.check(100, 3)
    module.limit_activations(10**9, threads=2)
    fail_on_the_second_worker(module)
    mean = module.constants["mean"].copy()
    with pytest.raises(ValueError, match="cannot take"):
        module(np.zeros((4, 100), np.float32), one_hot(np.zeros(4, int), 3))
    assert [op for op in module.ops if any(name.startswith("_") for name in vars(op))] == []
    assert all(op.peers is None for op in module.ops)
    np.testing.assert_array_equal(module.constants["mean"], mean)  # the batch never got its statistics


def test_a_failing_pass_on_another_thread_raises_in_the_caller_and_leaves_nothing_kept() -> None:
    module = conv_module()
    module.max_pass, module.workers = 2, 2
    fail_on_the_second_worker(module)
    with pytest.raises(ValueError, match="cannot take"):
        module(np.zeros((4, 100), np.float32), one_hot(np.zeros(4, int), 3))
    assert [op for op in module.ops if any(name.startswith("_") for name in vars(op))] == []
    previous = blas.threads()
    assert previous is None or previous == blas.set_threads(previous)  # restored after the failure


def test_limit_activations_sizes_passes_by_bytes_per_sample() -> None:
    module = conv_module()
    module.check(100, 3)
    per_sample = module.sample_bytes
    # float32: c1, n1, r1 (6x5x5), c2 (6x3x3), p, f (6), logits (3)
    assert per_sample == 4 * (3 * 150 + 54 + 6 + 6 + 3)
    module.limit_activations(10 * per_sample + 1)
    assert module.max_pass == 10
    module.limit_activations(1)
    assert module.max_pass == 1  # never 0: one sample per pass at least
    module.limit_activations(None)
    assert module.max_pass is None
    module.limit_activations(10 * per_sample + 1, threads=2)
    assert (module.max_pass, module.workers) == (5, 2)  # passes that run at once share the budget
    dropout = conv_module(dropout=True)
    dropout.check(100, 3)
    dropout.limit_activations(10 * dropout.sample_bytes + 1, threads=2)
    assert (dropout.max_pass, dropout.workers) == (10, 1)  # masks drawn in pass order: one thread
