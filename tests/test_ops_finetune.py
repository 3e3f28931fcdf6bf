"""The fine-tuning ops (Conv, BatchNormalization, pooling, element-wise) against torch autograd in float64.

Each case runs the numpy op forward, then backward with a random output gradient, and compares the
output and every input gradient with torch's for the same function, within 1e-10 (float64 through
both). The ops keep the input dtype, so this tests the same code the engine runs in float32.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgetune.runtime.ops import OPS, UnknownOp, get_op
from edgetune.runtime.ops.conv import Conv
from edgetune.runtime.ops.elementwise import Add, Clip, Mul, Sigmoid
from edgetune.runtime.ops.norm import BatchNormalization
from edgetune.runtime.ops.pool import GlobalAveragePool, ReduceMean

TOL = 1e-10


def _rand(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape)


def _check(got, want: torch.Tensor | None, what: str) -> None:
    if want is None:
        assert got is None, what
        return
    assert got is not None, what
    np.testing.assert_allclose(got, want.detach().numpy(), rtol=TOL, atol=TOL, err_msg=what)


def _torch_grads(fn, inputs: list[np.ndarray | None], grad: np.ndarray) -> tuple[torch.Tensor, list]:
    ts = [None if a is None else torch.tensor(a, requires_grad=True) for a in inputs]
    y = fn(*ts)
    y.backward(torch.tensor(grad))
    return y, [None if t is None else t.grad for t in ts]


# (N, C, H, W), M, kernel, stride, ONNX pads [top, left, bottom, right], group, bias
CONVS = {
    "pointwise": ((3, 5, 4, 4), 7, 1, 1, (0, 0, 0, 0), 1, False),
    "pointwise-bias": ((2, 6, 3, 5), 4, 1, 1, (0, 0, 0, 0), 1, True),
    "pointwise-stride2": ((2, 4, 5, 5), 3, 1, 2, (0, 0, 0, 0), 1, False),
    "depthwise-3x3-s1": ((2, 6, 7, 7), 6, 3, 1, (1, 1, 1, 1), 6, False),
    "depthwise-5x5-s1": ((2, 4, 7, 7), 4, 5, 1, (2, 2, 2, 2), 4, False),
    "depthwise-5x5-s2-asymmetric": ((2, 5, 14, 14), 5, 5, 2, (1, 1, 2, 2), 5, False),
    "depthwise-3x3-s2-odd-nopad": ((2, 3, 9, 8), 3, 3, 2, (0, 0, 0, 0), 3, True),
    "depthwise-multiplier-2": ((2, 3, 6, 6), 6, 3, 1, (1, 1, 1, 1), 3, False),
    "grouped-3x3": ((2, 4, 6, 6), 6, 3, 1, (1, 1, 1, 1), 2, True),
    "dense-3x3-s2": ((2, 3, 8, 7), 5, 3, 2, (0, 1, 1, 0), 1, True),
}


def _torch_conv(stride: int, pads: tuple[int, int, int, int], group: int):
    top, left, bottom, right = pads

    def fn(x, w, b=None):
        return F.conv2d(F.pad(x, (left, right, top, bottom)), w, b, stride=stride, groups=group)

    return fn


@pytest.mark.parametrize("case", CONVS)
def test_conv_matches_torch(case):
    shape, m, k, stride, pads, group, bias = CONVS[case]
    rng = np.random.default_rng(len(case))
    x, w = _rand(rng, *shape), _rand(rng, m, shape[1] // group, k, k)
    inputs = [x, w] + ([_rand(rng, m)] if bias else [])
    op = Conv(kernel_shape=[k, k], strides=[stride, stride], pads=list(pads), group=group, dilations=[1, 1])
    y = op.forward(*inputs)
    grad = _rand(rng, *y.shape)
    want_y, want_grads = _torch_grads(_torch_conv(stride, pads, group), inputs, grad)
    _check(y, want_y, "y")
    got = op.backward(grad)
    assert len(got) == len(inputs)
    for name, g, want in zip(("dx", "dw", "db"), got, want_grads, strict=False):
        _check(g, want, name)


@pytest.mark.parametrize("mode, pads", [("SAME_UPPER", (1, 1, 2, 2)), ("SAME_LOWER", (2, 2, 1, 1)), ("VALID", (0,) * 4)])
def test_conv_auto_pad_is_the_explicit_pads_it_stands_for(mode, pads):
    rng = np.random.default_rng(1)
    x, w = _rand(rng, 2, 3, 14, 14), _rand(rng, 3, 1, 5, 5)
    op = Conv(auto_pad=mode, strides=[2, 2], group=3)
    y = op.forward(x, w)
    grad = _rand(rng, *y.shape)
    want_y, (gx, gw) = _torch_grads(_torch_conv(2, pads, 3), [x, w], grad)
    _check(y, want_y, "y")
    dx, dw = op.backward(grad)
    _check(dx, gx, "dx")
    _check(dw, gw, "dw")


def test_conv_skips_gradients_nobody_needs_and_ignores_memory_layout():
    rng = np.random.default_rng(2)
    x, w, b = _rand(rng, 2, 4, 5, 5), _rand(rng, 4, 1, 3, 3), _rand(rng, 4)
    op = Conv(pads=[1, 1, 1, 1], group=4)
    op.needs_grad = (False, True, False)
    y = op.forward(x, w, b)
    grad = _rand(rng, *y.shape)
    dx, dw, db = op.backward(grad)
    assert dx is None and db is None
    channels_last = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    again = Conv(pads=[1, 1, 1, 1], group=4)
    np.testing.assert_allclose(again.forward(channels_last, w, b), y, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(again.backward(np.ascontiguousarray(grad))[1], dw, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("case", ["depthwise-5x5-s2-asymmetric", "grouped-3x3"])
def test_conv_in_chunks_of_images_computes_the_same(monkeypatch, case):
    import edgetune.runtime.ops.conv as conv_module

    shape, m, k, stride, pads, group, bias = CONVS[case]
    rng = np.random.default_rng(11)
    x, w = _rand(rng, 3, *shape[1:]), _rand(rng, m, shape[1] // group, k, k)
    results = []
    for chunk in (1 << 30, 1):  # whole batch, then one image per chunk
        monkeypatch.setattr(conv_module, "CHUNK_BYTES", chunk)
        op = Conv(strides=[stride, stride], pads=list(pads), group=group)
        y = op.forward(x, w)
        results.append((y, *op.backward(np.ones_like(y) + y)))
    for whole, chunked in zip(*results, strict=True):
        np.testing.assert_allclose(chunked, whole, rtol=TOL, atol=TOL)


def test_conv_refuses_what_it_cannot_run():
    with pytest.raises(UnknownOp, match="dilations"):
        Conv(dilations=[2, 2])
    with pytest.raises(UnknownOp, match="unsupported attributes"):
        Conv(kernel=[3, 3])
    with pytest.raises(UnknownOp, match="2-D"):
        Conv(strides=[1, 1, 1])
    with pytest.raises(ValueError, match="does not fit"):
        Conv(group=2).forward(np.zeros((1, 3, 4, 4)), np.zeros((4, 1, 3, 3)))


@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (6, 4)])
def test_batchnorm_frozen_statistics_match_torch_eval(shape):
    rng = np.random.default_rng(3)
    c = shape[1]
    x, scale, bias = _rand(rng, *shape), _rand(rng, c), _rand(rng, c)
    mean, var = _rand(rng, c), rng.uniform(0.5, 2.0, c)
    buffers = mean.copy(), var.copy()
    op = BatchNormalization(epsilon=1e-3, momentum=0.99)
    y = op.forward(x, scale, bias, *buffers)
    grad = _rand(rng, *shape)
    want_y, (gx, gs, gb) = _torch_grads(
        lambda x_, s_, b_: F.batch_norm(x_, torch.tensor(mean), torch.tensor(var), s_, b_, False, 0.0, 1e-3),
        [x, scale, bias], grad)
    _check(y, want_y, "y")
    got = op.backward(grad)
    assert got[3:] == (None, None)
    for name, g, want in zip(("dx", "dscale", "dB"), got, (gx, gs, gb), strict=False):
        _check(g, want, name)
    np.testing.assert_array_equal(buffers[0], mean)  # running statistics untouched
    np.testing.assert_array_equal(buffers[1], var)


@pytest.mark.parametrize("shape", [(8, 3, 4, 4), (16, 5)])
def test_batchnorm_batch_statistics_match_torch_train_and_update_running_stats(shape):
    rng = np.random.default_rng(4)
    c = shape[1]
    x, scale, bias = _rand(rng, *shape) * 3 + 1, _rand(rng, c), _rand(rng, c)
    mean, var = _rand(rng, c), rng.uniform(0.5, 2.0, c)
    onnx_momentum = 0.9
    run_mean, run_var = mean.copy(), var.copy()
    op = BatchNormalization(epsilon=1e-5, momentum=onnx_momentum, training_mode=1)
    y = op.forward(x, scale, bias, run_mean, run_var)
    grad = _rand(rng, *shape)
    t_mean, t_var = torch.tensor(mean), torch.tensor(var)
    want_y, (gx, gs, gb) = _torch_grads(  # torch's momentum is 1 - ONNX's
        lambda x_, s_, b_: F.batch_norm(x_, t_mean, t_var, s_, b_, True, 1 - onnx_momentum, 1e-5),
        [x, scale, bias], grad)
    _check(y, want_y, "y")
    for name, g, want in zip(("dx", "dscale", "dB"), op.backward(grad), (gx, gs, gb), strict=False):
        _check(g, want, name)
    _check(run_mean, t_mean, "running mean")
    _check(run_var, t_var, "running var")


def test_batchnorm_in_eval_uses_running_statistics_even_in_batch_mode():
    rng = np.random.default_rng(5)
    x, scale, bias, mean, var = _rand(rng, 4, 2, 3, 3), _rand(rng, 2), _rand(rng, 2), _rand(rng, 2), np.ones(2)
    batch = BatchNormalization(training_mode=1)
    batch.training = False
    frozen = BatchNormalization()
    before = mean.copy()
    np.testing.assert_allclose(batch.forward(x, scale, bias, mean, var), frozen.forward(x, scale, bias, mean, var))
    np.testing.assert_array_equal(mean, before)
    with pytest.raises(UnknownOp, match="training_mode"):
        BatchNormalization(training_mode=2)


@pytest.mark.parametrize("channels_last", [False, True])
def test_global_average_pool_matches_torch(channels_last):
    rng = np.random.default_rng(6)
    x = _rand(rng, 3, 4, 5, 6)
    if channels_last:
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    op = GlobalAveragePool()
    y = op.forward(x)
    grad = _rand(rng, *y.shape)
    want_y, (gx,) = _torch_grads(lambda t: t.mean((2, 3), keepdim=True), [x], grad)
    _check(y, want_y, "y")
    (dx,) = op.backward(grad)
    _check(dx, gx, "dx")
    assert (dx.strides[1] < dx.strides[3]) == channels_last  # the gradient keeps the input's layout


@pytest.mark.parametrize("axes, keepdims", [([2, 3], 1), ([-1, -2], 0), ([1], 1), (None, 0)])
def test_reduce_mean_matches_torch(axes, keepdims):
    rng = np.random.default_rng(7)
    x = _rand(rng, 2, 3, 4, 5)
    op = ReduceMean(keepdims=keepdims)
    inputs = [x] if axes is None else [x, np.array(axes, dtype=np.int64)]
    y = op.forward(*inputs)
    grad = _rand(rng, *y.shape)
    dims = tuple(range(4)) if axes is None else tuple(axes)
    want_y, (gx,) = _torch_grads(lambda t: t.mean(dims, keepdim=bool(keepdims)), [x], grad)
    _check(y, want_y, "y")
    got = op.backward(grad)
    assert len(got) == len(inputs) and all(g is None for g in got[1:])
    _check(got[0], gx, "dx")


def test_reduce_mean_noop_and_bad_axes():
    x = np.arange(6.0).reshape(2, 3)
    op = ReduceMean(noop_with_empty_axes=1)
    np.testing.assert_array_equal(op.forward(x), x)
    np.testing.assert_array_equal(op.backward(np.ones((2, 3)))[0], np.ones((2, 3)))
    with pytest.raises(UnknownOp, match="out of range"):
        ReduceMean().forward(x, np.array([2]))


@pytest.mark.parametrize("bounds, ref", [
    ((0.0, 6.0), F.relu6), ((0.0, None), F.relu), ((-1.0, 1.0), lambda t: F.hardtanh(t, -1.0, 1.0)),
    ((None, None), lambda t: t * 1.0)])
def test_clip_matches_torch_including_values_on_the_bounds(bounds, ref):
    rng = np.random.default_rng(8)
    x = _rand(rng, 4, 6) * 4
    x[0, :4] = [0.0, 6.0, -1.0, 1.0]  # exactly on a bound: PyTorch passes no gradient there
    given = tuple(None if b is None else np.array(b) for b in bounds)
    given = given if bounds != (0.0, None) else given[:1]  # an absent trailing input
    op = Clip()
    y = op.forward(x, *given)
    grad = _rand(rng, *y.shape)
    want_y, (gx,) = _torch_grads(ref, [x], grad)
    _check(y, want_y, "y")
    got = op.backward(grad)
    assert len(got) == 1 + len(given) and all(g is None for g in got[1:])
    _check(got[0], gx, "dx")


@pytest.mark.parametrize("bounds", [(0.0, 6.0), (None, 1.0)])
def test_clip_keeps_the_channels_last_layout_of_its_input(bounds):
    """A mask in another layout than the activations made this op and every later one 3-4x slower."""
    rng = np.random.default_rng(9)
    x = np.ascontiguousarray((_rand(rng, 2, 3, 4, 5) * 4).transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    grad = np.ascontiguousarray(_rand(rng, 2, 3, 4, 5).transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    op = Clip()
    y = op.forward(x, *(None if b is None else np.array(b) for b in bounds))
    (dx, *_) = op.backward(grad)
    lo, hi = (-np.inf if bounds[0] is None else bounds[0]), bounds[1]
    np.testing.assert_array_equal(dx, np.where((x > lo) & (x < hi), grad, 0))
    for a in (y, dx):
        assert a.transpose(0, 2, 3, 1).flags.c_contiguous  # channels-last memory, like the input


BROADCASTS = [((2, 3, 4, 5), (2, 3, 4, 5)), ((2, 3, 4, 5), (1, 3, 1, 1)), ((2, 3, 4, 5), (3, 1, 1)),
              ((2, 3, 4, 5), (5,)), ((1, 3, 1, 1), (2, 3, 4, 5)), ((2, 1), (1, 3)), ((4,), ())]


@pytest.mark.parametrize("op_cls, fn", [(Add, torch.add), (Mul, torch.mul)])
@pytest.mark.parametrize("shapes", BROADCASTS)
def test_add_and_mul_broadcast_like_torch(op_cls, fn, shapes):
    rng = np.random.default_rng(9)
    a, b = _rand(rng, *shapes[0]), _rand(rng, *shapes[1])
    op = op_cls()
    y = op.forward(a, b)
    grad = _rand(rng, *y.shape)
    want_y, (ga, gb) = _torch_grads(fn, [a, b], grad)
    _check(y, want_y, "y")
    got = op.backward(grad)
    _check(got[0], ga, "da")
    _check(got[1], gb, "db")
    assert np.shape(got[0]) == shapes[0] and np.shape(got[1]) == shapes[1]


def test_mul_skips_a_gradient_nobody_needs():
    op = Mul()
    op.needs_grad = (True, False)
    op.forward(np.ones((2, 3)), np.full((1, 3), 2.0))
    ga, gb = op.backward(np.ones((2, 3)))
    assert gb is None and np.array_equal(ga, np.full((2, 3), 2.0))


def test_sigmoid_matches_torch_and_does_not_overflow():
    rng = np.random.default_rng(10)
    x = np.concatenate([_rand(rng, 20) * 5, [-1000.0, 1000.0, 0.0]])
    op = Sigmoid()
    with np.errstate(over="raise"):
        y = op.forward(x)
    grad = _rand(rng, *y.shape)
    want_y, (gx,) = _torch_grads(torch.sigmoid, [x], grad)
    _check(y, want_y, "y")
    _check(op.backward(grad)[0], gx, "dx")


def test_the_registry_holds_exactly_these_ops_from_these_files():
    mine = {name for name, cls in OPS.items()
            if cls.__module__.rsplit(".", 1)[-1] in ("conv", "norm", "pool", "elementwise")}
    assert mine == {"Conv", "BatchNormalization", "GlobalAveragePool", "ReduceMean", "Clip", "Add", "Mul", "Sigmoid"}
    for name in mine:
        assert get_op(name).op_type == name


def test_float32_stays_float32_whatever_the_constants():
    x = np.linspace(-2, 8, 24, dtype=np.float32).reshape(1, 2, 3, 4)
    assert Clip().forward(x, np.array(0.0), np.array(6.0)).dtype == np.float32  # float64 bounds
    conv = Conv(pads=[1, 1, 1, 1], group=2)
    y = conv.forward(x, np.ones((2, 1, 3, 3), np.float32))
    assert y.dtype == np.float32 and all(g.dtype == np.float32 for g in conv.backward(np.ones_like(y)))
    bn = BatchNormalization(epsilon=1e-3)
    ones = np.ones(2, np.float32)
    assert bn.forward(x, ones, ones, ones, ones).dtype == np.float32
