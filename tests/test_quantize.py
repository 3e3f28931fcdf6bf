"""int8 frozen part (edgetune.convert.quantize): calibration choice, the portable QDQ graph, the record in
`meta`, the cache key, and a quantized `.tod` that loads, trains, resumes and exports like any other."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgetune.cli.main import main
from edgetune.convert import Int8, quantize_tod
from edgetune.convert.quantize import calibration_indices, check_portable, host_reduce_range
from edgetune.errors import UserError
from edgetune.runtime import Context, TrainSession
from edgetune.runtime.dataset import load_dataset
from edgetune.runtime.format import load_file
from edgetune.runtime.trainer import Trainer
from tests.fixtures_data import random_image

TINY_PER_CLASS = 10


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes of 8x8 RGB BMPs (the tiny model's input size), 10 each: 6 train, 2 test, 2 validation."""
    root = tmp_path_factory.mktemp("tiny-data")
    for k in range(3):
        (root / str(k)).mkdir()
        for i in range(TINY_PER_CLASS):
            random_image(root / str(k) / f"{i:03d}.bmp", (8, 8), seed=100 * k + i)
    (root / "classes.txt").write_text("".join(f"{k}\tclass{k}\n" for k in range(3)), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory: pytest.TempPathFactory, tiny_dataset: Path) -> tuple[str, str]:
    """The tiny fp32 model and its int8 version (calibrated on the tiny dataset, minmax: 18 images)."""
    from edgetune.runtime.format import save_file
    from tests.fixtures_runtime import tiny_model

    directory = tmp_path_factory.mktemp("tiny-int8")
    fp32 = save_file(tiny_model(head="mlp"), directory / "tiny.tod")
    int8 = quantize_tod(fp32, directory / "tiny_int8", Int8(tiny_dataset, images=18, method="minmax",
                                                           reduce_range=True))
    return fp32, int8


def images_of(data: Path, preprocessing: dict, split: str = "validation") -> np.ndarray:
    return load_dataset(data, preprocessing).split(split).images(None)


# --- choices made before quantizing -------------------------------------------------------------

@pytest.mark.parametrize("flags, machine, expected", [
    ("fpu avx2 avx512f avx512_vnni", "x86_64", False),
    ("fpu avx2 avx_vnni", "x86_64", False),
    ("fpu avx2 fma", "x86_64", True),           # e.g. AMD Zen 3, Intel Haswell/Skylake client
    ("fp asimd asimddp", "aarch64", False),     # ARM: no u8s8 saturation
])
def test_reduce_range_follows_vnni(tmp_path, flags, machine, expected) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    reduce, why = host_reduce_range(cpuinfo, machine)
    assert reduce is expected
    assert ("no VNNI" in why) if expected else ("VNNI" in why or "not x86" in why)


def test_reduce_range_without_cpuinfo_assumes_no_vnni(tmp_path) -> None:
    assert host_reduce_range(tmp_path / "absent", "x86_64") == (
        True, "host CPU flags unknown (no /proc/cpuinfo): assumed without VNNI")


def test_calibration_images_are_stratified_and_spread() -> None:
    labels = np.array([0] * 60 + [1] * 60 + [2] * 5)
    picked = calibration_indices(labels, 30)
    counts = np.bincount(labels[picked])
    assert counts.tolist() == [10, 10, 5]  # 30 / 3 classes each; the small class gives all it has
    first = picked[labels[picked] == 0]
    assert first[0] == 0 and first[-1] == 59 and np.all(np.diff(first) >= 6)  # spread over the class
    assert np.array_equal(calibration_indices(labels, 30), picked)  # deterministic


@pytest.mark.parametrize("spec, message", [
    (dict(method="kl"), "unknown calibration method 'kl'"),
    (dict(images=0), "at least 1 image"),
    (dict(percentile=0.0), "percentile must be in"),
    (dict(exclude=("no_such_node",)), r"nodes to leave in fp32 \['no_such_node'\] are not in the frozen graph"),
])
def test_bad_options_are_user_errors(tiny_pair, tiny_dataset, tmp_path, spec, message) -> None:
    with pytest.raises(UserError, match=message):
        quantize_tod(tiny_pair[0], tmp_path / "x", Int8(tiny_dataset, **spec))
    assert not list(tmp_path.iterdir())  # nothing written


def test_calibration_set_without_train_images_is_refused(tiny_pair, tmp_path) -> None:
    data = tmp_path / "two-per-class"  # indices 0 and 1 of each class: validation and test only
    for k in range(3):
        (data / str(k)).mkdir(parents=True)
        for i in range(2):
            random_image(data / str(k) / f"{i}.bmp", (8, 8), seed=i)
    (data / "classes.txt").write_text("0\ta\n1\tb\n2\tc\n", encoding="utf-8")
    with pytest.raises(UserError, match="classes without train images"):
        quantize_tod(tiny_pair[0], tmp_path / "x", Int8(data))


# --- the quantized model -------------------------------------------------------------------------

def test_the_int8_graph_is_portable_qdq(tiny_pair) -> None:
    """Standard-domain QuantizeLinear/DequantizeLinear at opset 18, IR <= 8: what onnxruntime 1.17 loads."""
    tod = load_file(tiny_pair[1])
    model = onnx.load_from_string(bytes(tod.blobs["frozen.onnx"]))
    check_portable(bytes(tod.blobs["frozen.onnx"]))
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 18)] and model.ir_version <= 8
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops and all(n.domain == "" for n in model.graph.node)
    weights = {t.name: t for t in model.graph.initializer}
    conv_w = next(weights[n.input[0]] for n in model.graph.node
                  if n.op_type == "DequantizeLinear" and n.input[0] in weights and len(weights[n.input[0]].dims) == 4)
    assert conv_w.data_type == onnx.TensorProto.INT8  # the weights themselves are stored in int8
    onnx.checker.check_model(model, full_check=True)


def depthwise_tod(path: Path) -> str:
    """The tiny model with a depthwise 3x3 conv (group 3) before a 1x1 conv (group 1) in its frozen part."""
    from onnx import TensorProto, helper, numpy_helper

    from edgetune.runtime.format import save_file
    from tests.fixtures_runtime import TINY_FEATURES, TINY_SHAPE, tiny_model

    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (3, 1, 3, 3)).astype(np.float32), "dw.w"),
             numpy_helper.from_array(rng.normal(0, 0.5, (TINY_FEATURES, 3, 1, 1)).astype(np.float32), "pw.w")]
    nodes = [helper.make_node("Conv", ["data", "dw.w"], ["d"], name="dw", pads=[1, 1, 1, 1], group=3),
             helper.make_node("Relu", ["d"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "pw.w"], ["p"], name="pw"),
             helper.make_node("GlobalAveragePool", ["p"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["features"], name="flat", axis=1)]
    graph = helper.make_graph(nodes, "dw", [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", *TINY_SHAPE])],
                              [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", TINY_FEATURES])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    tod = tiny_model(head="dense")
    tod.blobs["frozen.onnx"] = model.SerializeToString()
    return save_file(tod, path)


@pytest.mark.parametrize("reduce_range", [True, False])
def test_reduce_range_spares_depthwise_weights(tiny_dataset, tmp_path, reduce_range) -> None:
    """7-bit weights (|q| <= 64) for the 1x1 conv under reduce_range; the depthwise conv keeps 8 bits (127)."""
    int8 = quantize_tod(depthwise_tod(tmp_path / "dw.tod"), tmp_path / "dw_int8",
                        Int8(tiny_dataset, images=9, method="minmax", reduce_range=reduce_range))
    tod = load_file(int8)
    model = onnx.load_from_string(bytes(tod.blobs["frozen.onnx"]))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    peak = {name: int(np.abs(inits[f"{name}_quantized"].astype(np.int32)).max()) for name in ("dw.w", "pw.w")}
    assert peak == {"dw.w": 127, "pw.w": 64 if reduce_range else 127}
    q = tod.meta["frozen"]["quantization"]
    assert q.get("eight_bit_depthwise") == (1 if reduce_range else None)


def test_meta_records_the_quantization(tiny_pair, tiny_dataset) -> None:
    fp32, int8 = (load_file(p) for p in tiny_pair)
    q = int8.meta["frozen"]["quantization"]
    assert {k: q[k] for k in ("scheme", "format", "per_channel", "reduce_range", "nodes_excluded")} == {
        "scheme": "int8", "format": "QDQ", "per_channel": True, "reduce_range": True, "nodes_excluded": []}
    assert q["reduce_range_reason"] == "set explicitly" and q["tool"].startswith("onnxruntime.quantization ")
    assert q["eight_bit_depthwise"] == 0  # the tiny graph's one convolution is not depthwise
    cal = q["calibration"]
    assert (cal["method"], cal["images"], cal["split"]) == ("minmax", 18, "train") and len(cal["images_sha256"]) == 64
    assert "quantization" not in fp32.meta["frozen"]
    # everything but the frozen part and the record is the fp32 model's
    assert {k: v for k, v in int8.meta.items() if k not in ("frozen", "name")} == \
        {k: v for k, v in fp32.meta.items() if k not in ("frozen", "name")}
    assert int8.meta["name"] == "tiny_int8"
    for name, tensor in fp32.tensors.items():
        np.testing.assert_array_equal(int8.tensors[name], tensor)


def test_int8_features_are_close_to_fp32(tiny_pair, tiny_dataset) -> None:
    fp32, int8 = (TrainSession.create(p, Context(cache=False)) for p in tiny_pair)
    x = images_of(tiny_dataset, fp32.preprocessing)  # images calibration never saw
    a, b = fp32.extract_features(x), int8.extract_features(x)
    cosine = np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() > 0.99 and not np.array_equal(a, b)


def test_the_cache_key_changes_with_the_frozen_part(tiny_pair, tiny_dataset, tmp_path) -> None:
    """One cache directory, both models: the int8 model never reads the fp32 model's features."""
    cache = tmp_path / "cache"
    x = images_of(tiny_dataset, load_file(tiny_pair[0]).meta["preprocessing"])
    keys = [f"image{i}" for i in range(len(x))]
    features = {}
    for path in tiny_pair:
        sess = TrainSession.create(path, Context(cache_dir=cache))
        features[path] = sess.extract_features(x, keys=keys)
        sess.feature_cache.flush()
    assert len([d for d in cache.iterdir() if d.is_dir()]) == 2
    uncached = TrainSession.create(tiny_pair[1], Context(cache=False)).extract_features(x)
    np.testing.assert_array_equal(features[tiny_pair[1]], uncached)
    assert not np.array_equal(features[tiny_pair[0]], features[tiny_pair[1]])


def test_int8_model_trains_resumes_and_exports(tiny_pair, tiny_dataset, tmp_path) -> None:
    import subprocess
    import sys

    model = Path(shutil.copy(tiny_pair[1], tmp_path / "m.tod"))
    data = load_dataset(tiny_dataset, load_file(model).meta["preprocessing"])
    whole = TrainSession.create(model)
    Trainer(whole, data.train, data.test, seed=3, test_every=2, target_accuracy=None).fit(6)
    part = TrainSession.create(model)
    Trainer(part, data.train, data.test, seed=3, test_every=2, target_accuracy=None).fit(3)
    checkpoint = part.save(tmp_path / "ckpt.tod")
    assert load_file(checkpoint).meta["frozen"]["quantization"] == load_file(model).meta["frozen"]["quantization"]
    resumed = TrainSession.create(checkpoint)
    Trainer(resumed, data.train, data.test, seed=99, test_every=2, target_accuracy=None).fit(3)
    for name, p in whole.params.items():
        np.testing.assert_array_equal(resumed.params[name].data, p.data)
    x = data.validation.images(None)
    expected = resumed.eval().run_graph(x)["logits"]
    onnx_path = resumed.export_inference(tmp_path / "clf.onnx")
    np.save(tmp_path / "x.npy", x)
    script = ("import numpy as np, onnxruntime as ort\n"
              f"s = ort.InferenceSession({str(onnx_path)!r}, providers=['CPUExecutionProvider'])\n"
              f"np.save({str(tmp_path / 'y.npy')!r}, s.run(['logits'], {{'data': np.load({str(tmp_path / 'x.npy')!r})}})[0])\n")
    subprocess.run([sys.executable, "-c", script], check=True)
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, rtol=1e-5, atol=1e-5)
    exported = onnx.load(onnx_path)
    assert "QuantizeLinear" in {n.op_type for n in exported.graph.node}


def test_an_int8_model_is_not_quantized_twice(tiny_pair, tiny_dataset, tmp_path) -> None:
    with pytest.raises(UserError, match="already quantized"):
        quantize_tod(tiny_pair[1], tmp_path / "again", Int8(tiny_dataset))


# --- the command ---------------------------------------------------------------------------------

def test_cli_quantizes_a_tod_and_names_it(tiny_pair, tiny_dataset, tmp_path, capsys) -> None:
    model = Path(shutil.copy(tiny_pair[0], tmp_path / "tiny.tod"))
    assert main(["convert", "--tod", str(model), "--quantize", "int8", "--calibration", str(tiny_dataset),
                 "--calibration-images", "9", "--calibration-method", "percentile",
                 "--calibration-percentile", "99.9", "--reduce-range", "off"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'tiny_int8.tod'}"
    q = load_file(tmp_path / "tiny_int8.tod").meta["frozen"]["quantization"]
    assert (q["calibration"]["method"], q["calibration"]["percentile"], q["calibration"]["images"],
            q["reduce_range"]) == ("percentile", 99.9, 9, False)


@pytest.mark.parametrize("argv, message", [
    (["--quantize", "int8"], "--quantize int8 needs --calibration DIR"),
    (["--calibration", "somewhere"], "--calibration applies to --quantize int8 only"),
    (["--quantize", "int8", "--calibration", "DATA", "--calibration-images", "0"], "at least 1 image"),
    ([], "--tod converts an existing model's frozen part: it needs --quantize"),
])
def test_cli_mistakes_are_one_line_exit_2(tiny_pair, tiny_dataset, tmp_path, capsys, argv, message) -> None:
    argv = [str(tiny_dataset) if a == "DATA" else a for a in argv]
    assert main(["convert", "--tod", tiny_pair[0], "--output", str(tmp_path / "x"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edgetune convert: error:") and message in err[0]
    assert not os.path.exists(tmp_path / "x.tod")


# --- the real backbone ---------------------------------------------------------------------------

@pytest.mark.slow
def test_lite0_int8_tracks_fp32_on_real_images_and_trains(lite0_onnx, lite0_tod, fashion_dir, mini_fashion_dir,
                                                          tmp_path, capsys) -> None:
    """Lite0 converted with the default calibration (300 train images of the 100-per-class Fashion-MNIST set).

    Tolerances, on 100 validation images the calibration never saw (the features are Lite0's 1000
    ImageNet logits): every image's cosine similarity to fp32 >= 0.80, the mean >= 0.95, and the
    same top-1 logit as fp32 on >= 60% of the images. Measured with the same settings on the 600
    validation images of Fashion-MNIST 300 per class: min 0.870, mean 0.969, top-1 agreement 0.700,
    and a linear probe within 0.7 points of fp32 (bench/RESULTS.md, int8 section). A saturating int8 graph
    (8-bit weights on this x86 CPU without VNNI) gives min 0.57, mean 0.86, top-1 0.43.
    """
    from edgetune.cli import net_runner
    from edgetune.convert import convert

    int8 = convert(lite0_onnx, tmp_path / "lite0_int8", quantize=Int8(fashion_dir))
    q = load_file(int8).meta["frozen"]["quantization"]
    assert (q["calibration"]["images"], q["calibration"]["split"]) == (300, "train")
    fp32_session, int8_session = (TrainSession.create(p, Context(cache=False, threads=2)) for p in (lite0_tod, int8))
    validation = load_dataset(fashion_dir, fp32_session.preprocessing).validation
    x = validation.images(range(0, len(validation), 2))
    a, b = fp32_session.extract_features(x), int8_session.extract_features(x)
    cosine = np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() >= 0.80 and cosine.mean() >= 0.95, (cosine.min(), cosine.mean())
    assert np.mean(a.argmax(1) == b.argmax(1)) >= 0.60

    # net_runner trains it, saves a checkpoint and resumes from it exactly like an fp32 model
    model = Path(shutil.copy(int8, tmp_path / "m.tod"))
    args = ["-d", str(mini_fashion_dir), "--target-accuracy", "1.01", "--threads", "2", "--lr", "0.01"]
    assert net_runner.main(["-f", str(model), "-c", "40", "-s", "20", *args]) == 0
    whole = capsys.readouterr().out.splitlines()
    assert net_runner.main(["-f", str(tmp_path / "m_trained_20.tod"), "-c", "20", *args]) == 0
    resumed = capsys.readouterr().out.splitlines()
    losses = lambda lines: [ln.split(" [")[0] for ln in lines if "Loss is" in ln]  # noqa: E731 - "i: Loss is X"
    assert losses(resumed) == losses(whole)[20:]  # the checkpoint's data order and state carry on
    assert resumed[-1] == whole[-1] and float(whole[-1].split("=")[1]) > 0.5  # 10 classes: chance is 0.1


def test_a_conv_left_in_fp32_runs_in_fp32_on_the_device() -> None:
    """An excluded Conv reads a dequantized input but keeps float weights; onnxruntime (>= 1.20, level >= 2)
    would quantize those weights to 8 bits when the session loads (`WeightBiasQuantization`) unless told not to."""
    from onnx import TensorProto, helper, numpy_helper

    from edgetune.runtime.frozen import _inference_session

    rng = np.random.default_rng(3)
    w = rng.normal(0, 1, (16, 8, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]),
         helper.make_node("Conv", ["d", "w"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("QuantizeLinear", ["c", "s2", "z"], ["q2"]),
         helper.make_node("DequantizeLinear", ["q2", "s2", "z"], ["y"])],
        "excluded_conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 6, 6])],
        [numpy_helper.from_array(np.array(0.02, np.float32), "s"), numpy_helper.from_array(np.array(128, np.uint8), "z"),
         numpy_helper.from_array(np.array(0.01, np.float32), "s2"),
         numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    x = rng.normal(0, 0.5, (1, 8, 6, 6)).astype(np.float32)
    d = (np.clip(np.round(x / 0.02) + 128, 0, 255) - 128) * np.float32(0.02)  # what DequantizeLinear gives
    xp = np.pad(d, ((0, 0), (0, 0), (1, 1), (1, 1)))
    want = np.einsum("ncij,mcij->nm", np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(2, 3))
                     .transpose(0, 2, 3, 1, 4, 5).reshape(36, 8, 3, 3), w).T.reshape(1, 16, 6, 6)
    want = (np.clip(np.round(want / 0.01) + 128, 0, 255) - 128) * np.float32(0.01)  # the output's Q/DQ pair
    got = _inference_session(model.SerializeToString(), 1).run(None, {"x": x})[0]
    assert np.mean(got == want) > 0.99  # an 8-bit weight moves about a third of the outputs by a step
