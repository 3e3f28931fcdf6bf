"""Untrusted inputs (issue 16): a `.tod` or a dataset from someone else reads nothing, runs nothing, hangs nothing.

Every hostile input goes through the real CLI in a subprocess under `ulimit -v` (`VMEM_KIB`) and a
timeout (`TIMEOUT`): a refusal ends in exit status 2 and exactly one line on stderr naming what was
refused; an input that is only skipped (one image of a dataset, one cache segment) is named in a
warning and leaves the run's output identical to the run without it. A hang fails the test by its
timeout, a memory blow-up by the address-space cap (a MemoryError traceback or a kill, never exit 2).

Classes: the frozen graph (external data, code and control flow, the op allow-list, declared and
inferred sizes, the memory budget), the sizes a meta declares, dataset files (loader and
prepare-data), the package copy, the feature cache, output file modes. Deployment has its own tests
in tests/test_deploy_injection.py.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import json
import os
import re
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from edgetune.runtime import format as tod_format
from edgetune.runtime import graph_check, safe_read
from edgetune.runtime.graph_check import FROZEN_OPS, UnsafeGraph, check_frozen_graph
from tests.fixtures_data import write_dataset
from tests.fixtures_runtime import TINY_SHAPE, frozen_onnx, put, tiny_model

VMEM_KIB = 1 << 20  # 1 GiB of address space: Python, numpy, onnxruntime and the tiny model need ~0.3 GiB
TIMEOUT = 120       # seconds: a refusal takes 2-5 s on a loaded 2-core machine
SECRET = b"-----BEGIN OPENSSH PRIVATE KEY----- not really\n"


def cli(*argv: str | os.PathLike, cwd: Path, module: str = "edgetune.cli.net_runner",
        vmem_kib: int = VMEM_KIB) -> subprocess.CompletedProcess:
    """Run an edgetune command under `ulimit -v vmem_kib` and TIMEOUT (a hang raises TimeoutExpired)."""
    command = ["sh", "-c", 'ulimit -v "$0" && exec "$@"', str(vmem_kib), sys.executable, "-m", module,
               *map(os.fspath, argv)]
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT, env=env)


def refused(done: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit status 2, exactly one stderr line, no traceback, containing every needle; returns the line."""
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, f"exit {done.returncode}:\n{done.stderr[-3000:]}"
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clean prepared dataset for the tiny model: 3 classes x 10 BMPs of 8x8 (read-only)."""
    return write_dataset(tmp_path_factory.mktemp("untrusted") / "data")


@pytest.fixture
def world(tmp_path: Path) -> Path:
    """A working folder holding `.ssh/id_rsa` (a secret a relative external-data path would reach)."""
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".ssh" / "id_rsa").write_bytes(SECRET.ljust(864, b"x"))  # 8x3x3x3 float32: the conv weight's size
    return tmp_path


def save(tod: tod_format.TodFile, path: Path) -> Path:
    tod_format.save_file(tod, path)
    return path


def with_graph(model: onnx.ModelProto | bytes) -> tod_format.TodFile:
    """The tiny model with another frozen graph."""
    tod = tiny_model()
    tod.blobs["frozen.onnx"] = model if isinstance(model, bytes) else model.SerializeToString()
    return tod


# --- the frozen graph --------------------------------------------------------------------------

def _external(tensor: TensorProto, location: str | None = ".ssh/id_rsa") -> TensorProto:
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    if location is not None:
        entry = tensor.external_data.add()
        entry.key, entry.value = "location", location
    return tensor


def _graph(nodes: list, outputs: list[tuple[str, int, list]], inits: list | None = None,
           inputs: list | None = None) -> onnx.GraphProto:
    return helper.make_graph(nodes, "sub", [helper.make_tensor_value_info(*i) for i in (inputs or [])],
                             [helper.make_tensor_value_info(*o) for o in outputs], inits or [])


def _const(name: str, value: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def external_initializer(m: onnx.ModelProto) -> None:
    _external(m.graph.initializer[0])  # conv.w: 864 bytes read from ./.ssh/id_rsa


def external_location_only(m: onnx.ModelProto) -> None:
    m.graph.initializer[1].data_location = TensorProto.EXTERNAL


def external_constant(m: onnx.ModelProto) -> None:
    t = _external(_const("k", np.zeros(8, np.float32)), "../../../../etc/passwd")
    m.graph.node.insert(0, helper.make_node("Constant", [], ["k"], value=t))


def external_in_if_branch(m: onnx.ModelProto) -> None:
    branch = _graph([helper.make_node("Constant", [], ["y"], value=_external(_const("t", np.zeros(8, np.float32))))],
                    [("y", TensorProto.FLOAT, [8])])
    m.graph.initializer.append(_const("cond", np.array(True)))
    m.graph.node.append(helper.make_node("If", ["cond"], ["if_out"], then_branch=branch, else_branch=branch))


def endless_loop(m: onnx.ModelProto) -> None:
    body = _graph([helper.make_node("Identity", ["c_in"], ["c_out"])], [("c_out", TensorProto.BOOL, [])],
                  inputs=[("i", TensorProto.INT64, []), ("c_in", TensorProto.BOOL, [])])
    m.graph.initializer.extend([_const("trip", np.array(1 << 62, np.int64)), _const("go", np.array(True))])
    m.graph.node.append(helper.make_node("Loop", ["trip", "go"], [], body=body))


def nested_ifs(m: onnx.ModelProto) -> None:
    inner = _graph([helper.make_node("Constant", [], ["y"], value=_const("t", np.zeros(1, np.float32)))],
                   [("y", TensorProto.FLOAT, [1])])
    for _ in range(12):
        inner = _graph([helper.make_node("If", ["cond"], ["y"], then_branch=inner, else_branch=inner)],
                       [("y", TensorProto.FLOAT, [1])])
    m.graph.initializer.append(_const("cond", np.array(True)))
    m.graph.node.append(helper.make_node("If", ["cond"], ["deep"], then_branch=inner, else_branch=inner))


def contrib_op(m: onnx.ModelProto) -> None:
    m.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    m.graph.node[1].op_type, m.graph.node[1].domain = "Gelu", "com.microsoft"


def custom_domain_node(m: onnx.ModelProto) -> None:
    m.graph.node[1].domain = "my.custom.ops"


def local_function(m: onnx.ModelProto) -> None:
    m.functions.append(helper.make_function("local", "Twice", ["x"], ["y"], [helper.make_node("Add", ["x", "x"], ["y"])],
                                            [helper.make_opsetid("", 18)]))


def op_not_allowed(m: onnx.ModelProto) -> None:
    m.graph.node[1].op_type = "Tanh"  # standard ONNX, but no frozen part we export uses it


def ort_config(m: onnx.ModelProto) -> None:
    helper.set_model_props(m, {"ort_config": json.dumps({"session_options": {"intra_op_num_threads": 64}})})


def sparse_initializer(m: onnx.ModelProto) -> None:
    m.graph.sparse_initializer.append(helper.make_sparse_tensor(
        _const("sv", np.ones(1, np.float32)), _const("si", np.zeros(1, np.int64)), [4]))


def training_info(m: onnx.ModelProto) -> None:
    m.training_info.add()


def huge_declared_dims(m: onnx.ModelProto) -> None:
    del m.graph.initializer[1].dims[:]
    m.graph.initializer[1].dims.append(1 << 40)  # conv.b: 8 floats of data, 2^40 declared


def dims_not_the_data(m: onnx.ModelProto) -> None:
    m.graph.initializer[1].dims[:] = [9]


def constant_of_shape_bomb(m: onnx.ModelProto) -> None:
    m.graph.initializer.append(_const("shape", np.array([100000, 100000], np.int64)))
    m.graph.node.append(helper.make_node("ConstantOfShape", ["shape"], ["zeros"]))


def expand_bomb(m: onnx.ModelProto) -> None:
    m.graph.initializer.extend([_const("one", np.ones(1, np.float32)),
                                _const("shape", np.array([1, 100000, 100000], np.int64))])
    m.graph.node.append(helper.make_node("Expand", ["one", "shape"], ["big"]))


def conv_pads_bomb(m: onnx.ModelProto) -> None:
    pads = next(a for a in m.graph.node[0].attribute if a.name == "pads")
    pads.ints[:] = [1_000_000] * 4


def broadcast_bomb(m: onnx.ModelProto) -> None:
    m.graph.initializer.extend([_const("to3", np.array([-1, 8, 1], np.int64)),
                                _const("wide", np.ones((1, 1, 600_000), np.float32))])
    m.graph.node.extend([helper.make_node("Reshape", ["g", "to3"], ["g3"]),
                         helper.make_node("Add", ["g3", "wide"], ["spread"])])  # (N, 8, 600000) per batch


def concat_doubling(m: onnx.ModelProto) -> None:
    prev = "g"
    for i in range(24):  # 8 channels doubled 24 times: 2^27 per image
        m.graph.node.append(helper.make_node("Concat", [prev, prev], [f"twice{i}"], axis=1))
        prev = f"twice{i}"


def batch_mixing_reshape(m: onnx.ModelProto) -> None:
    m.graph.initializer.append(_const("flat", np.array([-1], np.int64)))
    m.graph.node.append(helper.make_node("Reshape", ["features", "flat"], ["mixed"]))


def qdq(m: onnx.ModelProto) -> None:
    """The tiny graph in QDQ form, as `convert --quantize int8` writes it: the image through
    QuantizeLinear/DequantizeLinear (one scale), the conv weight int8 with one scale per output channel,
    the bias int32."""
    w = numpy_helper.to_array(m.graph.initializer[0])
    b = numpy_helper.to_array(m.graph.initializer[1])
    w_scale = (np.abs(w).reshape(len(w), -1).max(1) / 127).astype(np.float32)
    b_scale = (w_scale * np.float32(2 / 255)).astype(np.float32)
    del m.graph.initializer[:]
    m.graph.initializer.extend([
        _const("x.scale", np.float32(2 / 255)), _const("x.zero", np.uint8(128)),
        _const("w.q", np.round(w / w_scale[:, None, None, None]).astype(np.int8)), _const("w.scale", w_scale),
        _const("w.zero", np.zeros(len(w), np.int8)),
        _const("b.q", np.round(b / b_scale).astype(np.int32)), _const("b.scale", b_scale),
        _const("b.zero", np.zeros(len(b), np.int32))])
    m.graph.node.insert(0, helper.make_node("QuantizeLinear", ["data", "x.scale", "x.zero"], ["x.q"], name="q_data"))
    m.graph.node.insert(1, helper.make_node("DequantizeLinear", ["x.q", "x.scale", "x.zero"], ["x.dq"], name="dq_data"))
    m.graph.node.insert(2, helper.make_node("DequantizeLinear", ["w.q", "w.scale", "w.zero"], ["conv.w"], axis=0,
                                            name="dq_w"))
    m.graph.node.insert(3, helper.make_node("DequantizeLinear", ["b.q", "b.scale", "b.zero"], ["conv.b"], axis=0,
                                            name="dq_b"))
    m.graph.node[4].input[0] = "x.dq"


def _qdq_then(mutate: Callable[[onnx.ModelProto], None]) -> Callable[[onnx.ModelProto], None]:
    def both(m: onnx.ModelProto) -> None:
        qdq(m)
        mutate(m)
    return both


def _qdq_node(m: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in m.graph.node if n.name == name)


def qdq_scale_per_channel_of_another_size(m: onnx.ModelProto) -> None:
    m.graph.initializer.extend([_const("w.scale7", np.ones(7, np.float32)), _const("w.zero7", np.zeros(7, np.int8))])
    _qdq_node(m, "dq_w").input[1:] = ["w.scale7", "w.zero7"]


def qdq_scale_along_the_batch(m: onnx.ModelProto) -> None:
    m.graph.initializer.extend([_const("x.scale4", np.ones(4, np.float32)), _const("x.zero4", np.zeros(4, np.uint8))])
    node = _qdq_node(m, "q_data")
    node.input[1:] = ["x.scale4", "x.zero4"]
    node.attribute.append(helper.make_attribute("axis", 0))


def qdq_zero_point_not_the_scale_shape(m: onnx.ModelProto) -> None:
    _qdq_node(m, "dq_w").input[2] = "x.zero"


def qdq_axis_out_of_range(m: onnx.ModelProto) -> None:
    next(a for a in _qdq_node(m, "dq_w").attribute if a.name == "axis").i = 4


GRAPH_CASES: dict[str, tuple[Callable[[onnx.ModelProto], None] | bytes, str]] = {
    "external initializer ./.ssh/id_rsa": (external_initializer, "external file ('.ssh/id_rsa')"),
    "external data_location alone": (external_location_only, "external file"),
    "external Constant attribute": (external_constant, "external file ('../../../../etc/passwd')"),
    "external data in an If branch": (external_in_if_branch, "external file ('.ssh/id_rsa')"),
    "Loop of 2^62 steps": (endless_loop, "control flow"),
    "subgraphs nested 13 deep": (nested_ifs, "nested more than"),
    "contrib op domain": (contrib_op, "domain 'com.microsoft'"),
    "custom op domain on a node": (custom_domain_node, "op domain 'my.custom.ops'"),
    "model-local function": (local_function, "model-local functions"),
    "standard op outside the allow-list": (op_not_allowed, "'Tanh' is not allowed in a frozen graph"),
    "ort_config session settings": (ort_config, "ort_config"),
    "sparse initializer": (sparse_initializer, "sparse initializers"),
    "training info": (training_info, "training info"),
    "initializer declaring 2^40 elements": (huge_declared_dims, "declares 1099511627776 elements"),
    "initializer dims not its data": (dims_not_the_data, "declares dims [9] (9 elements) but holds 8"),
    "ConstantOfShape 10^5 x 10^5": (constant_of_shape_bomb, "its constant target [100000, 100000]"),
    "Expand to 10^5 x 10^5": (expand_bomb, "its constant target [1, 100000, 100000]"),
    "Conv with pads of 10^6": (conv_pads_bomb, "elements per image, over the limit"),
    "broadcast to (N, 8, 600000)": (broadcast_bomb, "elements per image, over the limit"),
    "Concat doubling 24 times": (concat_doubling, "elements per image, over the limit"),
    "reshape mixing the batch": (batch_mixing_reshape, "cannot reshape ['N', 8] to [-1] for every batch size"),
    "QDQ scale: 7 for 8 channels": (_qdq_then(qdq_scale_per_channel_of_another_size),
                                    "scale [7] is neither one value nor one per entry of axis 0"),
    "QDQ scale along the batch": (_qdq_then(qdq_scale_along_the_batch),
                                  "scale [4] is neither one value nor one per entry of axis 0 of ['N', 3, 8, 8]"),
    "QDQ zero point not the scale's shape": (_qdq_then(qdq_zero_point_not_the_scale_shape),
                                             "zero point [] and scale [8] differ in shape"),
    "QDQ axis out of range": (_qdq_then(qdq_axis_out_of_range), "axis 4 is out of range for [8, 3, 3, 3]"),
    "not protobuf": (b"\xff" * 64, "not a valid ONNX model"),
    "unknown model field 111": (frozen_onnx() + bytes([0xF8, 0x06, 0x01]), "unknown field 111"),
}


def _crafted(case: str) -> bytes:
    mutate, _ = GRAPH_CASES[case]
    if isinstance(mutate, bytes):
        return mutate
    model = onnx.load_from_string(frozen_onnx())
    mutate(model)
    return model.SerializeToString()


def test_the_external_data_attack_is_real(world: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the check, onnxruntime (loading from bytes) reads ./.ssh/id_rsa into the conv weight."""
    from edgetune.runtime.ort import onnxruntime

    ort = onnxruntime()

    monkeypatch.chdir(world)
    sess = ort.InferenceSession(_crafted("external initializer ./.ssh/id_rsa"), providers=["CPUExecutionProvider"])
    leaked = sess.run(None, {"data": np.ones((1, *TINY_SHAPE), np.float32)})[0]
    honest = ort.InferenceSession(frozen_onnx(), providers=["CPUExecutionProvider"]).run(
        None, {"data": np.ones((1, *TINY_SHAPE), np.float32)})[0]
    assert not np.array_equal(leaked, honest)  # the secret's bytes became the weights


@pytest.mark.parametrize("case", sorted(GRAPH_CASES))
def test_hostile_frozen_graph_is_refused_before_onnxruntime(case: str, world: Path, data: Path) -> None:
    model = save(with_graph(_crafted(case)), world / "model.tod")
    line = refused(cli("-f", model, "-d", data, "-c", "2", cwd=world), "net_runner: error: ", GRAPH_CASES[case][1])
    assert SECRET.decode()[:20] not in line
    assert sorted(os.listdir(world)) == [".ssh", "model.tod"]  # no checkpoint, no cache, nothing else


@pytest.mark.parametrize("case", sorted(GRAPH_CASES))
def test_hostile_frozen_graph_is_an_unsafe_graph_in_process(case: str) -> None:
    """The checker itself, no CLI: the same message as an `UnsafeGraph`, for convert and the session alike."""
    with pytest.raises(UnsafeGraph, match=re.escape(GRAPH_CASES[case][1])):
        check_frozen_graph(_crafted(case), ("data", "features"), TINY_SHAPE)


def test_convert_refuses_external_data_without_reading_it(world: Path) -> None:
    """`edgetune convert --backbone-onnx` on a model zoo file naming .ssh/id_rsa next to it: `onnx.load`
    would read the secret into the model, and the .tod would carry it to the device. Refused, unread."""
    m = onnx.load_from_string(frozen_onnx())
    external_initializer(m)
    (world / "zoo.onnx").write_bytes(m.SerializeToString())
    assert onnx.load(world / "zoo.onnx").graph.initializer[0].raw_data == SECRET.ljust(864, b"x")  # the risk
    done = cli("convert", "--backbone-onnx", world / "zoo.onnx", "--cut", "features", "--num-classes", "3",
               "--output", world / "out", cwd=world, module="edgetune.cli.main")
    refused(done, "edgetune convert: error: the ONNX model is refused: initializer 'conv.w' keeps its data in an "
                  "external file ('.ssh/id_rsa')")
    assert sorted(os.listdir(world)) == [".ssh", "zoo.onnx"]


def test_convert_cli_refuses_a_loop_before_folding_it(world: Path) -> None:
    """A Loop of 2^62 constant steps would hang onnxruntime's constant folding at convert time."""
    m = onnx.load_from_string(frozen_onnx())
    endless_loop(m)
    (world / "zoo.onnx").write_bytes(m.SerializeToString())
    done = cli("convert", "--backbone-onnx", world / "zoo.onnx", "--cut", "features", "--num-classes", "3",
               "--output", world / "out", cwd=world, module="edgetune.cli.main")
    refused(done, "edgetune convert: error: the ONNX model is refused", "control flow")
    assert not (world / "out.tod").exists()


def _frozen_graph(channels: int, side: int) -> bytes:
    """Conv 3->channels 3x3 (pad 1) + Relu + GlobalAveragePool + Flatten on (N, 3, side, side)."""
    w = np.full((channels, 3, 3, 3), 0.01, np.float32)
    nodes = [helper.make_node("Conv", ["data", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["g"]), helper.make_node("Flatten", ["g"], ["features"])]
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, side, side])],
                              [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", channels])],
                              [_const("w", w)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model.SerializeToString()


def _sized_model(channels: int, side: int) -> tod_format.TodFile:
    """A consistent model whose frozen graph takes side x side images and gives `channels` features."""
    tod = tiny_model(head="dense")
    tod.blobs["frozen.onnx"] = _frozen_graph(channels, side)
    tod.meta["input"]["shape"] = [4, 3, side, side]
    tod.meta["preprocessing"]["size"] = [side, side]
    tod.meta["frozen"]["features"] = channels
    tod.tensors["param/head.weight"] = np.zeros((3, channels), np.float32)
    tod.tensors["optim/head.weight/momentum_buffer"] = np.zeros((3, channels), np.float32)
    return tod


def test_model_over_the_memory_budget_is_one_line_not_an_oom_kill(world: Path, data: Path) -> None:
    """Every size within its bound, but 64 channels of 1024x1024 per image, 4 images at a time, need
    about 4 GiB: under a 1 GiB address space that is refused with both sizes, before onnxruntime."""
    model = save(_sized_model(64, 1024), world / "model.tod")
    refused(cli("-f", model, "-d", data, "-c", "2", cwd=world), "net_runner: error: the frozen graph",
            "of memory but", "address-space limit, ulimit -v")


def test_model_file_larger_than_memory_is_refused_before_reading(world: Path, data: Path) -> None:
    model = world / "model.tod"
    with open(model, "wb") as f:  # sparse: 64 GiB claimed, nothing on disk
        f.write(tod_format.MAGIC)
        f.truncate(64 << 30)
    refused(cli("-f", model, "-d", data, "-c", "2", cwd=world), "net_runner: error: ", "68719476736 bytes",
            "half the memory")


def test_honest_models_load_under_the_same_bounds(world: Path, data: Path) -> None:
    """The control: the tiny model trains under the same cap and timeout, and a big-but-fitting one loads."""
    model = save(tiny_model(), world / "model.tod")
    done = cli("-f", model, "-d", data, "-c", "3", "-q", cwd=world)
    assert done.returncode == 0, done.stderr[-2000:]
    report = graph_check.admit_frozen_graph(_frozen_graph(16, 224), ("data", "features"), (3, 224, 224), 4)
    assert report.output == ("N", 16) and report.ops == {"Conv": 1, "Relu": 1, "GlobalAveragePool": 1, "Flatten": 1}


def test_int8_qdq_graph_passes_the_checker_and_trains(world: Path, data: Path) -> None:
    """The QDQ form of the tiny graph (what `convert --quantize int8` makes): admitted, its dequantized
    weights counted once as weights (not per image), and it trains under the same cap and timeout."""
    m = onnx.load_from_string(frozen_onnx())
    qdq(m)
    onnx.checker.check_model(m, full_check=True)
    blob = m.SerializeToString()
    report = check_frozen_graph(blob, ("data", "features"), TINY_SHAPE)
    fp32 = check_frozen_graph(frozen_onnx(), ("data", "features"), TINY_SHAPE)
    assert report.ops == {"QuantizeLinear": 1, "DequantizeLinear": 3, "Conv": 1, "Relu": 1, "GlobalAveragePool": 1,
                          "Flatten": 1}
    assert report.peak_bytes == fp32.peak_bytes  # the dequantized weights are not activations
    int8_initializers = (4 + 1) + (8 * 27 + 8 * 4 + 8) + (8 * 4 * 3)  # image q; weight q, scales, zeros; bias
    assert report.weight_bytes == int8_initializers + fp32.weight_bytes  # + the dequantized float weights, once
    model = save(with_graph(blob), world / "model.tod")
    done = cli("-f", model, "-d", data, "-c", "3", "-q", cwd=world)
    assert done.returncode == 0, done.stderr[-2000:]


# --- the sizes a meta declares ---------------------------------------------------------------

def _many_entries(tod: tod_format.TodFile) -> None:
    tod.blobs.update({f"junk/{i}": b"" for i in range(5000)})


META_CASES = {
    "num_classes 10^9": (put(10**9, "num_classes"), "num_classes is 1000000000, over the limit of 100000"),
    "batch_size 10^8": (put(10**8, "batch_size"), "batch_size is 100000000, over the limit"),
    "input 100000 x 100000": (put([4, 3, 100000, 100000], "input", "shape"), "input.shape height is 100000"),
    "batch of 4096 x 3 x 4096^2": (put([4096, 3, 4096, 4096], "input", "shape"), "bytes, over the 1073741824"),
    "preprocessing size 10^6": (put([10**6, 10**6], "preprocessing", "size"), "preprocessing.size is 1000000"),
    "resize_shorter 10^9": (put(10**9, "preprocessing", "resize_shorter"), "resize_shorter must be null"),
    "resize_shorter a string": (put("huge", "preprocessing", "resize_shorter"), "resize_shorter must be null"),
    "frozen.features 10^9": (put(10**9, "frozen", "features"), "frozen.features is 1000000000"),
    "class name of 10^5 characters": (put(["x" * 100_000, "b", "c"], "class_names"), "100000 characters"),
    "head of 2000 layers": (put([{"op": "relu"}] * 2000, "head"), "head has 2000 layers"),
    "5000 entries": (_many_entries, "{entries} entries, over the limit of 4096"),
}


@pytest.mark.parametrize("case", sorted(META_CASES))
def test_declared_size_over_its_bound_is_refused(case: str, world: Path, data: Path) -> None:
    tod = copy.deepcopy(tiny_model())
    mutate, needle = META_CASES[case]
    mutate(tod)
    needle = needle.format(entries=len(tod.tensors) + len(tod.blobs))
    model = save(tod, world / "model.tod")
    refused(cli("-f", model, "-d", data, "-c", "2", cwd=world), "net_runner: error: ", needle)


# --- dataset files -----------------------------------------------------------------------------

def _copy_tree(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _outside(where: Path) -> dict[str, Path]:
    """Files outside the dataset an attacker's links point at: a secret and a private photo (a valid BMP)."""
    where.mkdir()
    (where / "id_rsa").write_bytes(SECRET)
    photo = np.full((8, 8, 3), 250, np.uint8)
    Image.fromarray(photo).save(where / "private.bmp")
    (where / "private_album").mkdir()
    Image.fromarray(photo).save(where / "private_album" / "p.bmp")
    return {"secret": where / "id_rsa", "photo": where / "private.bmp", "album": where / "private_album"}


@pytest.fixture
def hostile_data(tmp_path: Path, data: Path) -> Path:
    """The clean dataset plus, in class 0, every kind of entry the loader must not read."""
    root = _copy_tree(data, tmp_path / "hostile")
    out = _outside(tmp_path / "outside")
    cls = root / "0"
    (cls / "a_secret.bmp").symlink_to(out["secret"])
    (cls / "b_photo.bmp").symlink_to(out["photo"])            # a valid image: would be trained on
    (cls / "c_zero.bmp").symlink_to("/dev/zero")
    (cls / "d_proc.bmp").symlink_to("/proc/self/environ")
    (cls / "e_album").symlink_to(out["album"])
    (cls / "f_loop.bmp").symlink_to("f_loop.bmp")
    os.mkfifo(cls / "g_fifo.bmp")
    with open(cls / "h_huge.bmp", "wb") as f:                 # sparse, over the per-image cap
        f.truncate(300 << 20)
    return root


def test_loader_skips_every_non_regular_or_outside_file_and_trains_as_without_them(
        tmp_path: Path, data: Path, hostile_data: Path) -> None:
    clean_model = save(tiny_model(), tmp_path / "clean.tod")
    model = save(tiny_model(), tmp_path / "model.tod")
    clean = cli("-f", clean_model, "-d", data, "-c", "4", cwd=tmp_path)
    done = cli("-f", model, "-d", hostile_data, "-c", "4", cwd=tmp_path)
    assert clean.returncode == 0 and done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == clean.stdout  # the private photo was not trained on, nothing else changed
    warnings = {line.split(": ", 2)[1].rsplit("/", 1)[1]: line.split(": ", 2)[2]
                for line in done.stderr.splitlines() if line.startswith("warning: skipped /")}
    outside = tmp_path / "outside"
    proc = warnings.pop("d_proc.bmp")  # /proc/self is the net_runner process: its pid is not known here
    assert re.fullmatch(rf"a link to /proc/\d+/environ, outside {re.escape(os.fspath(hostile_data))}: not followed", proc)
    assert warnings == {
        "a_secret.bmp": f"a link to {outside / 'id_rsa'}, outside {hostile_data}: not followed",
        "b_photo.bmp": f"a link to {outside / 'private.bmp'}, outside {hostile_data}: not followed",
        "c_zero.bmp": f"a link to /dev/zero, outside {hostile_data}: not followed",
        "e_album": f"a link to {outside / 'private_album'}, outside {hostile_data}: not followed",
        "f_loop.bmp": "broken or looping symlink",
        "g_fifo.bmp": "not a regular file (a FIFO)",
        "h_huge.bmp": f"{300 << 20} bytes, over the {257 << 20}-byte limit",
    }
    assert SECRET.decode()[:20] not in done.stdout + done.stderr


@pytest.mark.parametrize("kind", ["fifo", "link outside", "device", "huge", "directory"])
def test_hostile_class_file_is_one_line(kind: str, tmp_path: Path, data: Path) -> None:
    root = _copy_tree(data, tmp_path / "ds")
    classes = root / "classes.txt"
    text = classes.read_bytes()
    classes.unlink()
    if kind == "fifo":
        os.mkfifo(classes)
    elif kind == "link outside":
        (tmp_path / "elsewhere.txt").write_bytes(text)
        classes.symlink_to(tmp_path / "elsewhere.txt")
    elif kind == "device":
        classes.symlink_to("/dev/zero")
    elif kind == "huge":
        with open(classes, "wb") as f:
            f.write(text)
            f.truncate(1 << 30)
    else:
        classes.mkdir()
    model = save(tiny_model(), tmp_path / "model.tod")
    want = {"fifo": "not a regular file (a FIFO)", "link outside": "outside", "device": "outside",
            "huge": "1073741824 bytes, over the", "directory": "a directory, not a file"}[kind]
    refused(cli("-f", model, "-d", root, "-c", "2", cwd=tmp_path), "net_runner: error: cannot read", want)


def test_class_with_only_hostile_files_ends_in_exit_2(tmp_path: Path, data: Path) -> None:
    root = _copy_tree(data, tmp_path / "ds")
    out = _outside(tmp_path / "outside")
    for p in (root / "2").iterdir():
        p.unlink()
    (root / "2" / "photo.bmp").symlink_to(out["photo"])
    os.mkfifo(root / "2" / "fifo.bmp")
    model = save(tiny_model(), tmp_path / "model.tod")
    done = cli("-f", model, "-d", root, "-c", "2", cwd=tmp_path)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert lines[-1] == f"net_runner: error: class folder {root / '2'} (class 'class 2') has no usable images"
    assert lines[:-1] == [f"warning: skipped {root / '2' / 'fifo.bmp'}: not a regular file (a FIFO)",
                          f"warning: skipped {root / '2' / 'photo.bmp'}: a link to {out['photo']}, outside {root}: "
                          f"not followed"]


def test_prepare_images_never_reads_through_links_out_of_the_class(tmp_path: Path) -> None:
    src = tmp_path / "photos"
    for name in ("cat", "dog"):
        (src / name).mkdir(parents=True)
        Image.fromarray(np.full((40, 40, 3), 80 if name == "cat" else 160, np.uint8)).save(src / name / "ok.png")
    out = _outside(tmp_path / "outside")
    (src / "cat" / "secret.png").symlink_to(out["secret"])
    (src / "cat" / "photo.png").symlink_to(out["photo"])
    (src / "cat" / "zero.png").symlink_to("/dev/zero")
    os.mkfifo(src / "cat" / "fifo.png")
    (src / "cat" / "album").symlink_to(out["album"])
    done = cli("prepare-data", "--images", src, "-o", tmp_path / "prepared", "--crop", "8", "--resize-shorter", "8",
               cwd=tmp_path, module="edgetune.cli.main")
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(os.listdir(tmp_path / "prepared" / "0")) == ["ok.bmp"]
    for name in ("secret.png", "photo.png", "zero.png", "album"):
        assert f"{src / 'cat' / name}: a link to " in done.stderr and "outside" in done.stderr
    assert f"{src / 'cat' / 'fifo.png'}: not a regular file (a FIFO)" in done.stderr


def test_prepare_places365_list_cannot_climb_out_of_val_256(tmp_path: Path) -> None:
    """`../../outside/private.bmp 4` in places365_val.txt: a path traversal, skipped as outside."""
    src = tmp_path / "places"
    (src / "val_256").mkdir(parents=True)
    Image.fromarray(np.full((40, 40, 3), 90, np.uint8)).save(src / "val_256" / "a.jpg")
    _outside(tmp_path / "outside")
    (src / "places365_val.txt").write_text("../../outside/private.bmp 4\na.jpg 4\n")
    done = cli("prepare-data", "--places365", src, "--classes", "4", "-o", tmp_path / "prepared",
               cwd=tmp_path, module="edgetune.cli.main")
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(os.listdir(tmp_path / "prepared" / "0")) == ["a.bmp"]
    assert f"resolves to {tmp_path / 'outside' / 'private.bmp'}, outside {src / 'val_256'}: not followed" in done.stderr


def test_prepare_fashion_mnist_gzip_bomb_is_one_line(tmp_path: Path) -> None:
    """A 300 KB t10k-images .gz that inflates to 1 GiB: cut at the 256 MiB cap, under the 1 GiB address space."""
    source = tmp_path / "fashion"
    source.mkdir()
    member = gzip.compress(b"\x00" * (16 << 20), compresslevel=9)
    (source / "t10k-images-idx3-ubyte.gz").write_bytes(member * 64)  # 64 members of 16 MiB each
    (source / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x00"))
    done = cli("prepare-data", "--fashion-mnist", "--fashion-source", source, "-o", tmp_path / "out",
               cwd=tmp_path, module="edgetune.cli.main")
    refused(done, "error: ", "more than 268435456 bytes once gunzipped")


# --- the package copy ----------------------------------------------------------------------------

def test_package_copy_takes_regular_files_only(tmp_path: Path, hostile_data: Path) -> None:
    from edgetune.deploy.package import copy_regular_tree

    (hostile_data / "0" / "h_huge.bmp").unlink()  # a copy has no size cap: 300 MiB of zeros is no use here
    skipped = copy_regular_tree(hostile_data, tmp_path / "pkg_data")
    copied = sorted(os.fspath(p.relative_to(tmp_path / "pkg_data")) for p in (tmp_path / "pkg_data").rglob("*"))
    want = sorted(os.fspath(p.relative_to(hostile_data)) for p in hostile_data.rglob("*")
                  if not p.is_symlink() and (p.is_dir() or stat.S_ISREG(p.lstat().st_mode)))
    assert copied == want and len(copied) == 3 + 3 * 10 + 1  # the class folders, their images, classes.txt
    reasons = {Path(p).name: r for p, r in skipped}
    assert sorted(reasons) == ["a_secret.bmp", "b_photo.bmp", "c_zero.bmp", "d_proc.bmp", "e_album", "f_loop.bmp",
                               "g_fifo.bmp"]
    assert reasons["g_fifo.bmp"] == "not a regular file (a FIFO)"
    assert reasons["e_album"] == f"a link to {tmp_path / 'outside' / 'private_album'}: links are not followed"
    for path in (tmp_path / "pkg_data").rglob("*"):
        assert path.is_dir() or SECRET not in path.read_bytes()[:4096]


@pytest.mark.slow
def test_prepare_and_run_package_says_what_it_skipped(tmp_path: Path, hostile_data: Path) -> None:
    """The issue's case: `prepare-and-run -D` with a class folder linking out of the dataset."""
    (hostile_data / "0" / "h_huge.bmp").unlink()  # a 300 MiB sparse file is no use in a package test
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "onnxruntime-1.20.0-cp311-cp311-manylinux_2_27_x86_64.whl").write_bytes(b"stub")
    model = save(tiny_model(), tmp_path / "m.tod")
    done = subprocess.run([sys.executable, "-m", "edgetune.cli.main", "prepare-and-run", "-D", os.fspath(hostile_data),
                           "--model", os.fspath(model), "--wheels-from", os.fspath(wheels), "--no-run",
                           "-o", os.fspath(tmp_path / "pkg")], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    notes = [line for line in done.stderr.splitlines() if line.startswith("warning: not copied into the package: ")]
    assert len(notes) == 7 and "warning: 7 dataset entries were not copied (only regular files are)" in done.stderr
    for path in (tmp_path / "pkg").rglob("*"):
        assert not path.is_symlink()
        assert path.is_dir() or stat.S_ISREG(path.lstat().st_mode)
        assert path.is_dir() or SECRET not in path.read_bytes()
    assert sorted(os.listdir(tmp_path / "pkg" / "dataset" / "0")) == sorted(os.listdir(hostile_data / "1"))


# --- the feature cache -------------------------------------------------------------------------------

def test_hostile_cache_segments_are_ignored_without_reading_or_hanging(tmp_path: Path, data: Path) -> None:
    """The cache folder is data we wrote, read by the same rules: a FIFO, a device, a 1 GiB sparse index,
    a folder, a truncated segment and a segment whose data links to a file outside are each ignored
    (one warning) and recomputed: the run's output is that of the clean run."""
    model = save(tiny_model(), tmp_path / "model.tod")
    first = cli("-f", model, "-d", data, "-c", "4", "--cache-dir", tmp_path / "cache", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    (namespace,) = (tmp_path / "cache").iterdir()
    segments = sorted(namespace.glob("*.json"))
    index = json.loads(segments[0].read_text())
    data_file = segments[0].with_suffix(".f32")
    data_file.write_bytes(data_file.read_bytes()[:-4])                      # truncated by one value
    os.mkfifo(namespace / "fifo.json")
    (namespace / "zero.json").symlink_to("/dev/zero")
    with open(namespace / "huge.json", "wb") as f:
        f.truncate(1 << 30)
    (namespace / "folder.json").mkdir()
    outside = tmp_path / "outside.f32"                                     # the attacker's "features"
    outside.write_bytes(np.full(index["shape"], 7.0, np.float32).tobytes())
    evil = {**index, "sha256": hashlib.sha256(outside.read_bytes()).hexdigest()}
    (namespace / "evil.json").write_text(json.dumps(evil))
    (namespace / "evil.f32").symlink_to(outside)
    save(tiny_model(), model)
    again = cli("-f", model, "-d", data, "-c", "4", "--cache-dir", tmp_path / "cache", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]                      # not -7 (SIGBUS)
    assert again.stdout == first.stdout
    ignored = sorted(Path(line.split()[5]).name for line in again.stderr.splitlines()  # "... segment PATH (why)"
                     if line.startswith("feature cache: ignoring damaged segment"))
    assert ignored == sorted(["evil.json", "fifo.json", "folder.json", "huge.json", "zero.json", segments[0].name])


def test_cache_folder_that_is_a_file_is_one_line(tmp_path: Path, data: Path) -> None:
    (tmp_path / "cache").write_text("not a folder")
    model = save(tiny_model(), tmp_path / "model.tod")
    refused(cli("-f", model, "-d", data, "-c", "2", "-q", "--cache-dir", tmp_path / "cache", cwd=tmp_path),
            "net_runner: error: ", "cache")


# --- output files ------------------------------------------------------------------------------------

def test_checkpoint_written_over_a_setuid_file_keeps_permission_bits_only(tmp_path: Path, data: Path) -> None:
    model = save(tiny_model(), tmp_path / "model.tod")
    planted = tmp_path / "model_trained.tod"
    planted.write_bytes(b"old")
    os.chmod(planted, 0o7755)  # setuid, setgid, sticky
    done = cli("-f", model, "-d", data, "-c", "2", "-q", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert stat.S_IMODE(planted.stat().st_mode) == 0o755
    assert tod_format.load_file(planted).meta["optimizer_step"] == 2


# --- the one safe reader, directly ---------------------------------------------------------------------

def test_safe_read_refuses_what_claims_one_size_and_holds_another(tmp_path: Path) -> None:
    """procfs files claim 0 bytes and hold more; sysfs files claim 4096 and hold less."""
    with pytest.raises(safe_read.UnsafeFile, match="holds more bytes than its stated size 0"):
        safe_read.read_file("/proc/self/status", max_bytes=1 << 20)
    sysfs = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if sysfs.is_file() and sysfs.stat().st_size == 4096:
        with pytest.raises(safe_read.UnsafeFile, match="holds fewer bytes than its stated size 4096"):
            safe_read.read_file(sysfs, max_bytes=1 << 20)
    (tmp_path / "ok").write_bytes(b"fine")
    assert safe_read.read_file(tmp_path / "ok", max_bytes=4, root=tmp_path) == b"fine"
    with pytest.raises(safe_read.TooLarge, match="4 bytes, over the 3-byte limit"):
        safe_read.read_file(tmp_path / "ok", max_bytes=3)


@pytest.mark.parametrize("kind, reason", [
    ("fifo", "not a regular file (a FIFO)"), ("dev", "not a regular file (a device)"),
    ("dir", "a directory, not a file"), ("broken", "broken or looping symlink"),
    ("socket", "not a regular file (a socket)")])
def test_safe_read_never_opens_a_special_file(kind: str, reason: str, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    path = tmp_path / "x"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev":
        path.symlink_to("/dev/zero")
    elif kind == "dir":
        path.mkdir()
    elif kind == "broken":
        path.symlink_to("nowhere")
    else:
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(os.fspath(path))
    opened: list[str] = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda p, *a: opened.append(os.fspath(p)) or real_open(p, *a))
    with pytest.raises(safe_read.UnsafeFile) as e:
        safe_read.read_file(path, max_bytes=1 << 20)
    assert e.value.reason == reason and opened == []


def test_safe_read_root_is_checked_after_resolving_links(tmp_path: Path) -> None:
    root, other = tmp_path / "root", tmp_path / "other"
    (root / "sub").mkdir(parents=True)
    other.mkdir()
    (other / "f").write_text("x")
    (root / "sub" / "f").write_text("y")
    (root / "in").symlink_to(root / "sub" / "f")   # inside: followed
    (root / "out").symlink_to(other / "f")         # outside: refused
    (root / "subdir_link").symlink_to(other)       # a folder on the way leads out
    assert safe_read.read_file(root / "in", max_bytes=10, root=root) == b"y"
    for name, how in (("out", "a link to"), ("subdir_link/f", "resolves to")):
        with pytest.raises(safe_read.UnsafeFile, match=f"{how} {other / 'f'}, outside {root}: not followed"):
            safe_read.read_file(root / name, max_bytes=10, root=root)


# --- honest models: the real Lite0 frozen graph passes --------------------------------------------------

def _check_real(tod_path: Path) -> graph_check.GraphReport:
    tod = tod_format.load_file(tod_path)
    frozen = tod.meta["frozen"]
    report = check_frozen_graph(tod.blobs[frozen["blob"]], (frozen["input"], frozen["output"]),
                                tod.meta["input"]["shape"][1:])
    assert set(report.ops) <= set(FROZEN_OPS)
    assert report.output == ("N", frozen["features"])
    return report


@pytest.mark.slow
def test_converted_lite0_passes_the_allow_list_and_bounds(lite0_tod: Path) -> None:
    report = _check_real(lite0_tod)
    assert report.ops == {"Conv": 49, "Clip": 33, "Add": 9, "Shape": 1, "ReduceMean": 1, "Concat": 1, "Reshape": 1,
                          "Gemm": 1}
    assert report.largest[1] == 96 * 112 * 112 and 17 << 20 < report.weight_bytes < 18 << 20  # 17.7 MiB
    assert report.memory(4) < 200 << 20  # what the budget asks of a phone: about 110 MB


@pytest.mark.parametrize("message, proto", [
    (graph_check.MODEL, onnx.ModelProto), (graph_check.GRAPH, onnx.GraphProto), (graph_check.NODE, onnx.NodeProto),
    (graph_check.ATTR, onnx.AttributeProto), (graph_check.TENSOR, onnx.TensorProto)])
def test_wire_field_numbers_are_onnx_protos(message: graph_check.Message, proto: type) -> None:
    """The checker's field numbers (the runtime cannot import onnx) against the onnx package's descriptors:
    every allowed name has its number, every refused number is a real field of that message."""
    fields = proto.DESCRIPTOR.fields_by_name
    assert {name: fields[name].number for name in message.numbers} == message.numbers
    by_number = proto.DESCRIPTOR.fields_by_number
    assert all(number in by_number for number in message.refused), sorted(set(message.refused) - set(by_number))
    def repeated(f) -> bool:  # protobuf 6 has `is_repeated`, older ones `label`
        return f.is_repeated if hasattr(f, "is_repeated") else f.label == f.LABEL_REPEATED

    repeated_scalars = {f.number for f in proto.DESCRIPTOR.fields
                        if repeated(f) and f.type not in (f.TYPE_MESSAGE, f.TYPE_STRING, f.TYPE_BYTES)}
    lists = {n for n, wires in message.wires.items() if wires == graph_check.Message.WIRES["list"]}
    assert lists == repeated_scalars & set(message.wires)  # packed or not, both wire forms accepted
