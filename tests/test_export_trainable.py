"""`export --trainable`: choosing what trains, its recipe, and a trainable part made of ops the device runs.

The trainable part of the exported graph (the nodes that depend on a trainable parameter) must hold
only ops the runtime registry has or the structure ops (Gemm, MatMul, Relu, Flatten, Reshape,
Dropout, Identity), read exactly one tensor of the frozen part (the cut), keep its BatchNorm nodes
with their running statistics listed as buffers, and compute what torch computes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from edgetune.cli.export import optimizer_from
from edgetune.cli.main import main
from edgetune.convert.spec import SGD, Adam
from edgetune.convert.split import depends_on
from edgetune.errors import UserError
from edgetune.host import TransferNet, create_backbone, default_head, export
from edgetune.host.export import BN_MOMENTUM
from edgetune.host.trainable import RECIPES, select
from edgetune.runtime.ops import OPS
from edgetune.runtime.ort import onnxruntime
from tests.tiny_nets import TinyBackbone

ort = onnxruntime()

STRUCTURE = {"Gemm", "MatMul", "Relu", "Flatten", "Reshape", "Dropout", "Identity"}
PRE = {"scale": 1.0, "mean": [0.0] * 3, "std": [1.0] * 3}


def _meta(model: onnx.ModelProto) -> dict:
    return json.loads(next(p.value for p in model.metadata_props if p.key == "edgetune"))


def _trainable_part(model: onnx.ModelProto) -> tuple[list[onnx.NodeProto], list[str]]:
    """The trainable nodes and the frozen-part tensors they read (the cut)."""
    meta = _meta(model)
    nodes = depends_on(model.graph, set(meta["trainable"]))
    made = {o for n in nodes for o in n.output}
    data = {o for n in depends_on(model.graph, {"data"}) for o in n.output} | {"data"}
    return nodes, sorted({i for n in nodes for i in n.input if i in data and i not in made})


@pytest.fixture(scope="module")
def lite0_net() -> TransferNet:
    backbone, info = create_backbone("efficientnet-lite0")
    return TransferNet(backbone, default_head(info.features, 10, seed=0))


def test_choices_select_the_modules_after_the_cut(lite0_net):
    block = select(lite0_net, "last-block")
    assert block.choice == "last-block" and block.recipe == RECIPES["last-block"]
    assert {n.rsplit(".", 1)[0] for n in block.backbone} == {
        "backbone._blocks.15._expand_conv", "backbone._blocks.15._bn0", "backbone._blocks.15._depthwise_conv",
        "backbone._blocks.15._bn1", "backbone._blocks.15._project_conv", "backbone._blocks.15._bn2",
        "backbone._conv_head", "backbone._bn1", "backbone._fc"}
    assert set(block.params) == set(block.backbone) | {"head.weight", "head.bias"}
    stage = select(lite0_net, "last-stage")
    assert {n.split(".")[2] for n in stage.backbone if n.startswith("backbone._blocks.")} == {"11", "12", "13", "14", "15"}
    assert set(block.params) < set(stage.params)
    head = select(lite0_net, "head")
    assert head.params == ["head.bias", "head.weight"] and not head.backbone and head.recipe == RECIPES["head"]


def test_module_names_are_a_custom_choice_and_the_head_always_trains(lite0_net):
    sel = select(lite0_net, "backbone._conv_head, backbone._fc.weight")
    assert sel.choice == "custom" and sel.recipe == RECIPES["last-block"]
    assert sel.params == ["backbone._conv_head.weight", "backbone._fc.weight", "head.bias", "head.weight"]
    groups = sel.param_groups(RECIPES["last-stage"].backbone_lr_scale)
    assert groups == [{"name": "head", "params": ["head.bias", "head.weight"], "lr_scale": 1.0},
                      {"name": "backbone", "params": ["backbone._conv_head.weight", "backbone._fc.weight"],
                       "lr_scale": RECIPES["last-stage"].backbone_lr_scale}]
    assert select(lite0_net, ["head"]).choice == "head"
    with pytest.raises(UserError, match=r"'last-blok': not a choice \(head, last-block, last-stage\)"):
        select(lite0_net, "last-blok")
    with pytest.raises(UserError, match="empty"):
        select(lite0_net, " , ")


def _args(**given) -> argparse.Namespace:
    names = ("optimizer", "lr", "momentum", "dampening", "nesterov", "weight_decay", "betas", "eps")
    return argparse.Namespace(**{n: given.get(n) for n in names})


def test_optimizer_options_override_the_recipe_one_by_one():
    recipe = Adam(lr=1e-3, betas=(0.9, 0.999))
    assert optimizer_from(_args(), recipe) == recipe
    assert optimizer_from(_args(lr=0.01), recipe) == Adam(lr=0.01)
    with pytest.raises(UserError, match="--momentum is not a setting of adam"):
        optimizer_from(_args(momentum=0.5), recipe)  # an SGD option on Adam is a mistake, not ignored
    assert optimizer_from(_args(optimizer="sgd", lr=0.1), recipe) == SGD(lr=0.1)
    assert optimizer_from(_args()) == SGD()  # convert --backbone-onnx: the seed's SGD as before
    assert optimizer_from(_args(optimizer="adam", betas=[0.8, 0.9])) == Adam(betas=(0.8, 0.9))


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory) -> tuple[TransferNet, onnx.ModelProto]:
    torch.manual_seed(0)
    net = TransferNet(TinyBackbone(), default_head(6, 3, seed=1))
    for bn in (m for m in net.modules() if isinstance(m, nn.BatchNorm2d)):  # non-trivial statistics
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    path = tmp_path_factory.mktemp("tiny") / "tiny.onnx"
    export(net, "backbone.dw,backbone.pw,backbone.fc", input_shape=(3, 10, 10), preprocessing=PRE, batch_size=4,
           path=path, batch_statistics=False)  # BN as torch evaluates it (the batch-statistics test is below)
    return net, onnx.load(path)


def test_trainable_part_holds_device_ops_only(tiny_export):
    net, model = tiny_export
    nodes, cut = _trainable_part(model)
    assert len(cut) == 1
    kinds = [n.op_type for n in nodes]
    assert set(kinds) <= set(OPS) | STRUCTURE, kinds
    assert kinds.count("Conv") == 2 and kinds.count("BatchNormalization") == 2 and "Add" in kinds
    assert "Flatten" in kinds and "Pad" not in kinds
    dw = next(n for n in nodes if n.op_type == "Conv" and "dw" in n.input[1])
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in dw.attribute}
    assert attrs["pads"] == [0, 0, 1, 1] and attrs["group"] == 4 and attrs["strides"] == [2, 2]
    assert all(len(n.input) == 2 for n in nodes if n.op_type == "Conv")  # bias=False: no zero bias input
    bn = [n for n in nodes if n.op_type == "BatchNormalization"]
    assert all(onnx.helper.get_attribute_value(a) == 0 for n in bn for a in n.attribute if a.name == "training_mode")


def _attributes(node: onnx.NodeProto) -> dict:
    return {a.name: pytest.approx(onnx.helper.get_attribute_value(a)) for a in node.attribute}


def test_trainable_metadata_lists_groups_and_buffers(tiny_export):
    net, model = tiny_export
    meta = _meta(model)
    assert meta["trainable_choice"] == "custom"
    assert meta["optimizer"] == RECIPES["last-block"].optimizer.to_meta()
    backbone = sorted(n for n, _ in net.named_parameters() if n.startswith(("backbone.dw", "backbone.pw", "backbone.fc")))
    assert meta["trainable"] == sorted(backbone + ["head.bias", "head.weight"])
    assert meta["param_groups"][1] == {"name": "backbone", "params": backbone,
                                       "lr_scale": RECIPES["last-block"].backbone_lr_scale}
    assert meta["buffers"] == sorted(f"backbone.{m}.{s}" for m in ("dw.2", "pw.1") for s in ("running_mean", "running_var"))
    inits = {i.name for i in model.graph.initializer}
    assert set(meta["buffers"]) <= inits and set(meta["trainable"]) <= inits
    assert meta.get("schedule", "constant") == RECIPES["last-block"].schedule  # a custom deep choice's recipe


def _refused_at_convert(graph: Path, key: str, value: object, match: str) -> None:
    """The training graph with its metadata's `key` edited by hand to `value`: convert refuses it
    with a UserError matching `match` and writes nothing."""
    from edgetune.convert import convert

    model = onnx.load(graph)
    entry = next(p for p in model.metadata_props if p.key == "edgetune")
    entry.value = json.dumps({**json.loads(entry.value), key: value})
    bad = graph.with_name("bad.onnx")
    onnx.save(model, bad)
    with pytest.raises(UserError, match=match):
        convert(bad, bad.with_suffix(""))
    assert not bad.with_suffix(".tod").exists()


def test_the_recipes_schedule_travels_to_the_device_model(tmp_path):
    """export writes the recipe's schedule (or the one given) into the graph; convert carries it into the
    `.tod`, where net_runner reads it (`TrainSession.schedule`); `constant` is the absent key."""
    from edgetune.convert import convert
    from edgetune.runtime.format import load_file

    net = TransferNet(TinyBackbone(), default_head(6, 3, seed=1))
    shown = {}
    for name, trainable, schedule in [("head", "head", None), ("deep", "backbone.fc", None),
                                      ("step", "backbone.fc", "step"), ("flat", "backbone.fc", "constant")]:
        onnx_path = export(net, trainable, input_shape=(3, 10, 10), preprocessing=PRE, batch_size=4,
                           path=tmp_path / f"{name}.onnx", schedule=schedule)
        want = schedule or select(net, trainable).recipe.schedule
        assert _meta(onnx.load(onnx_path)).get("schedule", "constant") == want
        shown[name] = load_file(convert(onnx_path, tmp_path / name)).meta.get("schedule", "constant")
    assert shown == {"head": RECIPES["head"].schedule, "deep": RECIPES["last-block"].schedule,
                     "step": "step", "flat": "constant"}
    assert "schedule" not in _meta(onnx.load(tmp_path / "head.onnx"))  # the seed's graph is as it was
    with pytest.raises(UserError, match="unknown schedule 'linear'"):
        export(net, "head", input_shape=(3, 10, 10), preprocessing=PRE, path=tmp_path / "x.onnx", schedule="linear")
    _refused_at_convert(tmp_path / "deep.onnx", "schedule", "linear", "unknown schedule 'linear'")


def test_cleaned_graph_computes_what_torch_computes(tiny_export):
    net, model = tiny_export
    x = torch.randn(5, 3, 10, 10, generator=torch.Generator().manual_seed(2))  # another batch size than exported
    net.eval()
    with torch.no_grad():
        want = net(x).numpy()
    onnx.checker.check_model(model)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"data": x.numpy()})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_head_export_is_unchanged_by_the_cleanup(tmp_path):
    net = TransferNet(TinyBackbone(), default_head(6, 3, seed=1))
    model = onnx.load(export(net, "head", input_shape=(3, 10, 10), preprocessing=PRE, path=tmp_path / "h.onnx"))
    meta = _meta(model)
    assert meta["optimizer"] == SGD().to_meta() and meta["trainable"] == ["head.bias", "head.weight"]
    assert not {"param_groups", "buffers", "trainable_choice"} & set(meta)
    assert any(n.op_type == "Pad" for n in model.graph.node)  # the frozen part is the converter's to optimize


def test_cli_trainable_errors_are_one_line(capsys):
    for argv, match in [(["export", "--num-classes", "2", "--trainable", "nope"], "'nope': not a choice"),
                        (["export", "--num-classes", "2", "--backbone-lr-scale", "0"], "--backbone-lr-scale")]:
        assert main(argv) == 2
        out, err = capsys.readouterr()
        assert out == "" and len(err.strip().splitlines()) == 1 and match in err, err


@pytest.mark.slow
@pytest.mark.parametrize("choice, ops", [
    ("last-stage", {"Conv": 16, "BatchNormalization": 16, "Clip": 11, "Add": 3, "ReduceMean": 1, "Flatten": 1,
                    "Identity": 1, "Gemm": 2}),
])
def test_lite0_trainable_export(lite0_net, tmp_path, choice, ops):
    path = export(lite0_net, choice, class_names=[str(i) for i in range(10)], path=tmp_path / f"{choice}.onnx")
    model = onnx.load(path)
    nodes, cut = _trainable_part(model)
    kinds = [n.op_type for n in nodes]
    assert {k: kinds.count(k) for k in set(kinds)} == ops
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim[1:]] for v in model.graph.value_info}
    assert len(cut) == 1 and shapes[cut[0]] == [112, 14, 14]
    meta = _meta(model)
    assert meta["trainable_choice"] == choice and len(meta["buffers"]) == 2 * ops["BatchNormalization"]
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    lite0_net.eval()
    with torch.no_grad():
        want = lite0_net(x).numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"data": x.numpy()})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_the_recipes_mixup_travels_to_the_device_model(tmp_path):
    """export writes the recipe's mixup strength (or the one given) into the graph; convert carries it
    into the `.tod`, where the Trainer reads it (`TrainSession.mixup`); 0 is the absent key."""
    from edgetune.convert import convert
    from edgetune.runtime.format import load_file

    net = TransferNet(TinyBackbone(), default_head(6, 3, seed=1))
    shown = {}
    for name, trainable, mixup in [("head", "head", None), ("deep", "backbone.fc", None),
                                   ("strong", "backbone.fc", 1.0), ("off", "backbone.fc", 0.0)]:
        onnx_path = export(net, trainable, input_shape=(3, 10, 10), preprocessing=PRE, batch_size=4,
                           path=tmp_path / f"{name}.onnx", mixup=mixup)
        want = select(net, trainable).recipe.mixup if mixup is None else mixup
        assert _meta(onnx.load(onnx_path)).get("mixup", 0.0) == want
        shown[name] = load_file(convert(onnx_path, tmp_path / name)).meta.get("mixup", 0.0)
    assert shown == {"head": RECIPES["head"].mixup, "deep": RECIPES["last-block"].mixup, "strong": 1.0, "off": 0.0}
    assert "mixup" not in _meta(onnx.load(tmp_path / "head.onnx"))  # the seed's graph is as it was
    with pytest.raises(UserError, match="mixup must be a number"):
        export(net, "head", input_shape=(3, 10, 10), preprocessing=PRE, path=tmp_path / "x.onnx", mixup=-1)
    _refused_at_convert(tmp_path / "deep.onnx", "mixup", "strong", "mixup must be a number")


def test_batch_statistics_follow_the_recipe_or_the_argument(tmp_path):
    """The trainable part's BatchNorm nodes normalise with batch statistics (`training_mode=1`, PyTorch's
    default momentum) when the recipe (last-block's, which a custom choice reaching into the backbone
    gets) or the argument says so, and keep their running statistics and the backbone's momentum
    otherwise; convert carries the nodes as they are into the `.tod`. Asking for batch statistics of a
    part without BatchNorm is an error, not a silent no-op."""
    from edgetune.convert import convert
    from edgetune.runtime.format import load_file

    net = TransferNet(TinyBackbone(), default_head(6, 3, seed=1))
    for bn in (m for m in net.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.momentum = 0.01  # Lite0's: ONNX momentum 0.99
    modes = {}
    for name, statistics in [("deep", None), ("frozen", False), ("asked", True)]:
        onnx_path = export(net, "backbone.dw,backbone.pw,backbone.fc", input_shape=(3, 10, 10), preprocessing=PRE,
                           batch_size=4, path=tmp_path / f"{name}.onnx", batch_statistics=statistics)
        bn = [n for n in _trainable_part(onnx.load(onnx_path))[0] if n.op_type == "BatchNormalization"]
        tod = load_file(convert(onnx_path, tmp_path / name))
        stored = [n["attributes"] for n in tod.meta["head"] if n["op"] == "BatchNormalization"]
        assert [{k: pytest.approx(v) for k, v in a.items()} for a in stored] == [_attributes(n) for n in bn]
        modes[name] = [(a.get("training_mode", 0), round(a["momentum"], 4)) for a in stored]
    assert RECIPES["last-block"].batch_statistics and not RECIPES["head"].batch_statistics
    assert modes["deep"] == modes["asked"] == [(1, BN_MOMENTUM)] * 2
    assert modes["frozen"] == [(0, 0.99)] * 2
    with pytest.raises(UserError, match=r"batch statistics: the trainable part \(head\) has no BatchNormalization"):
        export(net, "head", input_shape=(3, 10, 10), preprocessing=PRE, path=tmp_path / "x.onnx", batch_statistics=True)
    assert not (tmp_path / "x.onnx").exists()
