"""TrainSession on the tiny model: modes, run_graph vs torch, labels, save/resume, export, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from edgetune.errors import UserError
from edgetune.runtime import Context, TensorSpec, TrainingDiverged, TrainSession
from edgetune.runtime import format as tod_format
from tests.fixtures_runtime import TINY_FEATURES, frozen_onnx


def batch(n: int = 4, seed: int = 1, c: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(0, 1, (n, 3, 8, 8)).astype(np.float32), rng.integers(0, c, n)


def test_create_exposes_the_model(tiny_tod) -> None:
    sess = TrainSession.create(tiny_tod(num_classes=5, batch_size=6))
    assert sess.inputs == [TensorSpec("data", (6, 3, 8, 8), "float32"), TensorSpec("label", (6, 5), "float32")]
    assert (sess.num_classes, sess.batch_size, sess.class_names) == (5, 6, ["0", "1", "2", "3", "4"])
    assert sess.preprocessing["mean"] == [127.0] * 3
    assert sess.training and sess.eval() is sess and not sess.training and sess.train().training
    assert sess.step == 0 and sess.learning_rate == 0.05
    assert len(sess.model_sha256) == 64 and sess.record["steps"] == 0


def test_frozen_part_matches_a_torch_reference(tiny_tod) -> None:
    """onnxruntime runs the frozen Conv+Relu+GAP graph as torch computes it."""
    import onnx
    from onnx import numpy_helper

    sess = TrainSession.create(tiny_tod())
    init = {t.name: numpy_helper.to_array(t) for t in onnx.load_from_string(frozen_onnx(0)).graph.initializer}
    x, _ = batch(5)
    ref = torch.relu(torch.nn.functional.conv2d(torch.from_numpy(x), torch.tensor(init["conv.w"]),
                                                torch.tensor(init["conv.b"]), padding=1)).mean((2, 3))
    np.testing.assert_allclose(sess.extract_features(x), ref.numpy(), rtol=1e-5, atol=1e-6)


def test_train_step_matches_torch(tiny_tod) -> None:
    """run_graph in train mode = features -> head -> mean CE -> SGD(momentum, dampening) step, as torch."""
    sess = TrainSession.create(tiny_tod(head="dense"))
    w = torch.tensor(sess.params["head.weight"].data, requires_grad=True)
    b = torch.tensor(sess.params["head.bias"].data, requires_grad=True)
    opt = torch.optim.SGD([w, b], lr=0.05, momentum=0.9, dampening=0.01)
    for step in range(5):
        x, y = batch(seed=step)
        feats = torch.from_numpy(sess.extract_features(x))
        out = sess.run_graph(x, y)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(feats @ w.T + b, torch.from_numpy(y))
        loss.backward()
        opt.step()
        assert out["loss"].shape == () and out["logits"].shape == (4, 3)
        assert sess.loss == pytest.approx(loss.item(), rel=1e-5)
    np.testing.assert_allclose(sess.params["head.weight"].data, w.detach().numpy(), rtol=1e-5, atol=1e-7)
    assert sess.step == 5 and sess.record["steps"] == 5


def test_int_labels_equal_one_hot(tiny_tod) -> None:
    path = tiny_tod()
    x, y = batch()
    a = TrainSession.create(path).eval().run_graph(x, y)
    b = TrainSession.create(path).eval().run_graph(x, np.eye(3, dtype=np.float32)[y])
    assert a["loss"] == b["loss"]
    np.testing.assert_array_equal(a["logits"], b["logits"])


def test_eval_is_forward_only_and_callback_sees_outputs(tiny_tod) -> None:
    sess = TrainSession.create(tiny_tod()).eval()
    before = {n: p.data.copy() for n, p in sess.params.items()}
    seen = []
    x, y = batch()
    out = sess.run_graph(x, y, after_callback=seen.append)
    out2 = sess.run_graph(x, y)
    assert seen == [out] and set(out) == {"loss", "logits"}
    np.testing.assert_array_equal(out["logits"], out2["logits"])  # dropout off in eval
    assert all(np.array_equal(before[n], p.data) for n, p in sess.params.items()) and sess.step == 0
    np.testing.assert_array_equal(sess.predictions, out["logits"].argmax(1))
    assert set(sess.run_graph(x)) == {"logits"}


def test_learning_rate_is_settable_and_saved(tiny_tod, tmp_path) -> None:
    sess = TrainSession.create(tiny_tod())
    sess.learning_rate = 0.001
    assert TrainSession.create(sess.save(tmp_path / "a.tod")).learning_rate == 0.001
    with pytest.raises(UserError, match="learning rate"):
        sess.learning_rate = float("inf")


def test_save_of_an_unchanged_model_round_trips_bytes(tiny_tod, tmp_path) -> None:
    path = tiny_tod()
    TrainSession.create(path).save(tmp_path / "copy.tod")
    assert (tmp_path / "copy.tod").read_bytes() == open(path, "rb").read()


@pytest.mark.parametrize("optimizer", [None, {"name": "adam", "lr": 0.01, "betas": [0.9, 0.999], "eps": 1e-8,
                                              "weight_decay": 0.0}])
def test_checkpoint_resume_is_bit_identical(tiny_tod, tmp_path, optimizer) -> None:
    """Params, optimizer slots, step count and the dropout generator all live in the checkpoint."""
    path = tiny_tod(optimizer=optimizer)
    batches = [batch(seed=s) for s in range(6)]
    full = TrainSession.create(path)
    full.seed(7)
    for x, y in batches:
        full.run_graph(x, y)
    part = TrainSession.create(path)
    part.seed(7)
    for x, y in batches[:3]:
        part.run_graph(x, y)
    resumed = TrainSession.create(part.save(tmp_path / "ckpt.tod"))
    assert resumed.step == 3
    for x, y in batches[3:]:
        resumed.run_graph(x, y)
    for name, p in full.params.items():
        np.testing.assert_array_equal(resumed.params[name].data, p.data)
    assert resumed.loss == full.loss
    tod = tod_format.load_file(resumed.save(tmp_path / "end.tod"))
    assert tod.meta["optimizer_step"] == 6 and tod.meta["training"]["steps"] == 6
    slot = "momentum_buffer" if optimizer is None else "exp_avg"
    assert np.abs(tod.tensors[f"optim/head.4.weight/{slot}"]).sum() > 0


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_non_finite_loss_raises_and_keeps_the_weights(tiny_tod) -> None:
    sess = TrainSession.create(tiny_tod())
    before = {n: p.data.copy() for n, p in sess.params.items()}
    x, y = batch()
    x[0, 0, 0, 0] = np.inf
    with pytest.raises(TrainingDiverged, match=r"step 1: loss is nan.*lower --lr"):
        sess.run_graph(x, y)
    assert isinstance(TrainingDiverged("x"), UserError)
    assert sess.step == 0 and all(np.array_equal(before[n], p.data) for n, p in sess.params.items())


@pytest.mark.parametrize("data, labels, message", [
    (np.zeros((4, 3, 9, 8), np.float32), None, r"data must be \(N, 3, 8, 8\)"),
    (np.zeros((4, 3, 8, 8), np.float64), None, "float32"),
    (np.zeros((4, 3, 8, 8), np.float32), np.array([0, 1, 2, 3]), "class ids in 0..2"),
    (np.zeros((4, 3, 8, 8), np.float32), np.zeros((4, 4), np.float32), "labels must be"),
    (np.zeros((4, 3, 8, 8), np.float32), None, "train mode needs labels"),
])
def test_bad_inputs_are_user_errors(tiny_tod, data, labels, message: str) -> None:
    with pytest.raises(UserError, match=message):
        TrainSession.create(tiny_tod()).run_graph(data, labels)


def test_damaged_or_incomplete_models_raise_tod_errors(tiny_tod, tmp_path) -> None:
    path = tiny_tod()
    raw = bytearray(open(path, "rb").read())
    raw[-3] ^= 0xFF
    (tmp_path / "bad.tod").write_bytes(raw)
    with pytest.raises(tod_format.ChecksumError):
        TrainSession.create(tmp_path / "bad.tod")
    tod = tod_format.load_file(path)
    del tod.meta["head"]
    with pytest.raises(tod_format.TodError, match="not a usable model.*head"):
        TrainSession.create(tod_format.save_file(tod, tmp_path / "nohead.tod"))


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.meta.update(num_classes=4), "num_classes=4"),
    (lambda t: t.meta["frozen"].update(features=9), "9 frozen features"),
    (lambda t: t.meta["frozen"].update(output="feats"), "no input 'data' / output 'feats'"),
    (lambda t: t.blobs.update({"frozen.onnx": b"not onnx"}), "not a valid ONNX model"),
    (lambda t: t.meta["optimizer"].update(name="lamb"), "unknown optimizer 'lamb'"),
    (lambda t: t.meta.update(schedule="linear"), "schedule must be one of constant, cosine, step, got 'linear'"),
    # consistent meta (preprocessing, input) but the graph's fixed image dims say 8x8
    (lambda t: (t.meta["input"].update(shape=[4, 3, 9, 9]), t.meta["preprocessing"].update(size=[9, 9])),
     r"graph takes \['N', 3, 8, 8\] \(element type 1\), the meta's images are float32 \[N, 3, 9, 9\]"),
    # a checkpoint (steps taken) without its momentum: zeros would silently change the next steps
    (lambda t: (t.meta.update(optimizer_step=5), t.tensors.pop("optim/head.bias/momentum_buffer")),
     "took 5 optimizer steps but has no optimizer state optim/head.bias/momentum_buffer"),
])
def test_inconsistent_models_are_rejected_at_load(tiny_tod, tmp_path, edit, message: str) -> None:
    tod = tod_format.load_file(tiny_tod(head="dense"))
    edit(tod)
    with pytest.raises(tod_format.TodError, match=message):
        TrainSession.create(tod_format.save_file(tod, tmp_path / "bad.tod"))


def test_fresh_model_without_optimizer_slots_starts_from_zero(tiny_tod, tmp_path) -> None:
    """Slots may be absent before the first step (zero is their defined start), not after."""
    tod = tod_format.load_file(tiny_tod(head="dense"))
    full = TrainSession.create(tod_format.save_file(tod, tmp_path / "full.tod"))
    del tod.tensors["optim/head.bias/momentum_buffer"]
    bare = TrainSession.create(tod_format.save_file(tod, tmp_path / "bare.tod"))
    for s in range(3):
        full.run_graph(*batch(seed=s))
        bare.run_graph(*batch(seed=s))
    for name, param in full.params.items():
        assert np.array_equal(bare.params[name].data, param.data)


def test_update_overflow_is_undone(tiny_tod) -> None:
    """A step whose update (not loss or gradient) overflows float32 is refused and leaves the
    weights, optimizer slots and step count exactly as before it."""
    sess = TrainSession.create(tiny_tod(head="dense"))
    sess.run_graph(*batch(seed=0))
    before = {n: p.data.copy() for n, p in sess.params.items()}
    slots = {k: v.copy() for k, v in sess.optimizer.state_tensors().items()}
    sess.params["head.bias"].data[:] = 3.3e38  # equal biases: softmax ignores them, the loss stays finite
    before["head.bias"] = sess.params["head.bias"].data.copy()
    sess.learning_rate = 1e38
    with pytest.raises(TrainingDiverged, match="at step 2: the update made a weight non-finite"):
        sess.run_graph(*batch(seed=1))
    assert sess.step == 1 and sess.record["steps"] == 1
    for name, param in sess.params.items():
        assert np.array_equal(param.data, before[name]), name
    for key, value in sess.optimizer.state_tensors().items():
        assert np.array_equal(value, slots[key]), key


@pytest.mark.parametrize("statement", ["import edgetune.runtime.frozen as f; f._inference_session(b'', 1)",
                                       "import edgetune.convert.frozen"])
def test_onnxruntime_telemetry_is_off(statement: str) -> None:
    """ORT_DISABLE_TELEMETRY=1 is in the environment at the moment onnxruntime is first imported
    (an import hook records it), which is when onnxruntime reads it: on the device (when the frozen
    graph is loaded; the load of these empty bytes then fails) and on the host."""
    script = textwrap.dedent(f"""
        import os, sys
        class Spy:
            def find_spec(self, name, path=None, target=None):
                if name == "onnxruntime":
                    print(os.environ.get("ORT_DISABLE_TELEMETRY"))
        sys.meta_path.insert(0, Spy())
        try:
            {statement}
        except ValueError:
            pass
    """)
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    assert done.stdout.split() == ["1"]


@pytest.mark.parametrize("head", ["mlp", "nobias"])
def test_export_inference_runs_with_numpy_and_onnxruntime_only(tiny_tod, tmp_path, head: str) -> None:
    sess = TrainSession.create(tiny_tod(head=head))
    for s in range(3):  # train a little so the export carries trained weights
        sess.run_graph(*batch(seed=s))
    x, _ = batch(n=7, seed=9)
    expected = sess.eval().run_graph(x)["logits"]
    onnx_path = sess.export_inference(tmp_path / "clf.onnx")
    np.save(tmp_path / "x.npy", x)
    script = (
        "import sys, json, numpy as np, onnxruntime as ort\n"
        f"s = ort.InferenceSession({str(onnx_path)!r}, providers=['CPUExecutionProvider'])\n"
        f"y = s.run(['logits'], {{'data': np.load({str(tmp_path / 'x.npy')!r})}})[0]\n"
        f"np.save({str(tmp_path / 'y.npy')!r}, y)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'onnx', 'edgetune'))))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert json.loads(done.stdout) == []
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, rtol=1e-5, atol=1e-5)

    import onnx
    model = onnx.load(onnx_path)
    onnx.checker.check_model(model, full_check=True)
    assert [o.name for o in model.graph.output] == ["logits"]
    assert "Dropout" not in [n.op_type for n in model.graph.node]


def test_runtime_never_imports_torch_or_onnx() -> None:
    script = ("import sys, edgetune.runtime, edgetune.runtime.trainer, edgetune.runtime.callbacks, "
              "edgetune.runtime.onnx_wire\n"
              "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'onnx')))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_threads_come_from_the_context(tiny_tod) -> None:
    sess = TrainSession.create(tiny_tod(), Context(threads=2, cache=False))
    sess.extract_features(batch()[0])
    opts = sess.frozen.session.get_session_options()
    assert (opts.intra_op_num_threads, opts.inter_op_num_threads) == (2, 1)
    with pytest.raises(UserError, match="threads"):
        Context(threads=0)
    assert TINY_FEATURES == sess.extract_features(batch()[0]).shape[1]


def test_lite0_cache_is_exact_and_export_matches(lite0_tod, tmp_path) -> None:
    """On the real backbone: a fresh model saves back to the same bytes, cached features (computed
    in other batches) equal uncached ones bit for bit, and the exported classifier reproduces the
    session's eval logits in a fresh process."""
    x = np.random.default_rng(0).uniform(-1, 1, (6, 3, 224, 224)).astype(np.float32)
    y = np.arange(6) % 10
    plain = TrainSession.create(lite0_tod, Context(cache=False))
    assert open(plain.save(tmp_path / "copy.tod"), "rb").read() == open(lite0_tod, "rb").read()  # round trip
    cached = TrainSession.create(lite0_tod, Context(cache=True, feature_batch=4))
    cached.extract_features(x[::-1].copy(), keys=[str(i) for i in range(5, -1, -1)])  # fill in another order
    losses = [plain.run_graph(x, y)["loss"] for _ in range(3)]
    losses_cached = [cached.run_head(cached.extract_features(x, keys=[str(i) for i in range(6)]), y)["loss"]
                     for _ in range(3)]
    assert losses == losses_cached

    expected = plain.eval().run_graph(x)["logits"]
    onnx_path = plain.export_inference(tmp_path / "lite0_classifier.onnx")
    np.save(tmp_path / "x.npy", x)
    script = ("import sys, numpy as np, onnxruntime as ort\n"
              f"s = ort.InferenceSession({str(onnx_path)!r}, providers=['CPUExecutionProvider'])\n"
              f"x = np.load({str(tmp_path / 'x.npy')!r})\n"
              f"np.save({str(tmp_path / 'y.npy')!r}, s.run(['logits'], {{'data': x}})[0])\n"
              "assert not any(m.split('.')[0] in ('torch', 'onnx', 'edgetune') for m in sys.modules)\n")
    subprocess.run([sys.executable, "-c", script], check=True)
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, rtol=1e-5, atol=1e-5)


def test_parameters_round_trip_and_bad_values_change_nothing(tiny_tod) -> None:
    session = TrainSession.create(tiny_tod(head="mlp"))
    before = session.parameters()
    doubled = {n: 2 * v for n, v in before.items()}
    session.load_parameters(doubled)
    assert all(np.array_equal(session.parameters()[n], doubled[n]) for n in before)
    session.parameters()["head.0.weight"][...] = 0  # a copy: the session is not changed through it
    assert np.array_equal(session.parameters()["head.0.weight"], doubled["head.0.weight"])
    bad = {**doubled, "head.4.bias": np.full_like(doubled["head.4.bias"], np.nan)}
    with pytest.raises(UserError, match="head.4.bias"):
        session.load_parameters(bad)
    with pytest.raises(UserError, match="missing"):
        session.load_parameters({n: v for n, v in doubled.items() if n != "head.0.bias"})
    assert all(np.array_equal(session.parameters()[n], doubled[n]) for n in before)


@pytest.mark.parametrize("bug", [KeyError("frozen"), TypeError("unsupported operand")])
def test_our_own_bugs_are_not_reported_as_a_bad_model(tiny_tod, monkeypatch, bug: Exception) -> None:
    """Only what the checks raise for a file they refuse becomes "not a usable model"; a KeyError or
    TypeError from the loading code itself is a bug and must surface as itself, traceback and all."""
    import edgetune.runtime.session as session_module

    def broken(*args, **kwargs):
        raise bug

    monkeypatch.setattr(session_module, "head_graph", broken)
    with pytest.raises(type(bug)) as info:
        TrainSession.create(tiny_tod())
    assert info.value is bug and not isinstance(info.value, tod_format.TodError)
