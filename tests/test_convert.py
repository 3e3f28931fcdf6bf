"""Convert: the `.tod` computes what the torch TransferNet computes, and bad graphs are refused by name.

The reference is the torch network itself on real images (Fashion-MNIST upscaled to 224 RGB, and
skimage's chelsea cat); the `.tod` side runs the frozen blob with onnxruntime plus the head in numpy,
and also through the runtime's `TrainSession`.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from edgetune.convert import convert, convert_backbone, tod_path
from edgetune.errors import UserError
from edgetune.host import TransferNet, create_backbone, default_head, export
from edgetune.runtime import TrainSession
from edgetune.runtime.format import load_file

FASHION = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
TOL = 1e-4  # max abs difference of logits, float32 through two different engines
CAT_CLASSES = range(281, 286)  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat


def _preprocess(img: Image.Image) -> np.ndarray:
    """Lite0 preprocessing: shorter side 256, center crop 224, (p - 127) / 128, CHW."""
    img = img.convert("RGB")
    w, h = img.size
    s = 256 / min(w, h)
    img = img.resize((round(w * s), round(h * s)), Image.BILINEAR)
    w, h = img.size
    left, top = (w - 224) // 2, (h - 224) // 2
    px = np.asarray(img.crop((left, top, left + 224, top + 224)), np.float32)
    return ((px - 127.0) / 128.0).transpose(2, 0, 1)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """4 Fashion-MNIST test images and chelsea, (5, 3, 224, 224) float32; chelsea last."""
    from skimage.data import chelsea

    with gzip.open(FASHION, "rb") as f:
        raw = f.read()
    pics = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28)[:4]
    batch = [_preprocess(Image.fromarray(p)) for p in pics] + [_preprocess(Image.fromarray(chelsea()))]
    return np.stack(batch)


@pytest.fixture(scope="module")
def torch_logits(images: np.ndarray) -> np.ndarray:
    """The reference: the same TransferNet as `lite0_onnx` (seed 0), in eval mode, in torch."""
    backbone, info = create_backbone("efficientnet-lite0")
    net = TransferNet(backbone, default_head(info.features, 10, seed=0)).eval()
    with torch.no_grad():
        return net(torch.from_numpy(images)).numpy()


def head_forward(meta: dict, tensors: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """Evaluate `meta.head` in numpy, eval mode (dropout is the identity)."""
    for layer in meta["head"]:
        if layer["op"] == "dense":
            x = x @ tensors["param/" + layer["weight"]].T
            if layer["bias"] is not None:
                x = x + tensors["param/" + layer["bias"]]
        elif layer["op"] == "relu":
            x = np.maximum(x, 0)
        elif layer["op"] == "flatten":
            x = x.reshape(len(x), -1)
    return x


def tod_forward(path: str | Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(features, logits) of a `.tod` on x: onnxruntime on the frozen blob + the numpy head."""
    tod = load_file(path)
    frozen = tod.meta["frozen"]
    sess = ort.InferenceSession(tod.blobs[frozen["blob"]], providers=["CPUExecutionProvider"])
    (features,) = sess.run([frozen["output"]], {frozen["input"]: x})
    return features, head_forward(tod.meta, tod.tensors, features)


def test_tod_forward_equals_torch_on_real_images(lite0_tod, images, torch_logits):
    _, logits = tod_forward(lite0_tod, images)
    assert logits.shape == (5, 10)
    assert np.abs(logits - torch_logits).max() < TOL


def test_runtime_session_eval_equals_torch(lite0_tod, images, torch_logits):
    sess = TrainSession.create(lite0_tod).eval()
    out = sess.run_graph(images)
    assert np.abs(out["logits"] - torch_logits).max() < TOL


def test_pretrained_backbone_is_loaded_chelsea_is_a_cat(lite0_tod, images):
    features, _ = tod_forward(lite0_tod, images[-1:])  # the frozen part ends at the 1000 ImageNet logits
    top5 = np.argsort(features[0])[::-1][:5]
    assert set(top5) & set(CAT_CLASSES), top5


def test_frozen_part_is_portable_with_dynamic_batch(lite0_tod, images):
    tod = load_file(lite0_tod)
    model = onnx.load_from_string(tod.blobs["frozen.onnx"])
    assert model.ir_version <= 8  # onnxruntime 1.17 reads IR <= 9
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 18)]  # 1.17 refuses unknown domain versions
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}  # standard ops only, no contrib ops
    assert "BatchNormalization" not in {n.op_type for n in model.graph.node}  # folded into the convs
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    f1, _ = tod_forward(lite0_tod, images[:1])
    f3, _ = tod_forward(lite0_tod, images[:3])
    assert f1.shape == (1, 1000) and f3.shape == (3, 1000)
    assert np.abs(f3[:1] - f1).max() < TOL


def test_meta_has_every_format_key(lite0_tod):
    tod = load_file(lite0_tod)
    meta = tod.meta
    assert set(meta) >= {"name", "created_by", "backbone", "num_classes", "class_names", "batch_size", "input",
                         "label", "preprocessing", "frozen", "head", "trainable", "loss", "optimizer",
                         "optimizer_step", "training"}
    assert meta["name"] == "transfer_learning_tod" and meta["backbone"] == "efficientnet-lite0"
    assert meta["class_names"] == [str(i) for i in range(10)]
    assert meta["input"] == {"name": "data", "shape": [32, 3, 224, 224], "dtype": "float32"}
    assert meta["label"]["shape"] == [32, 10] and meta["label"]["encoding"] == "one-hot"
    assert meta["preprocessing"]["mean"] == [127.0] * 3 and meta["preprocessing"]["std"] == [128.0] * 3
    assert meta["frozen"] == {"blob": "frozen.onnx", "input": "data", "output": "features", "features": 1000}
    assert meta["head"] == [{"op": "dense", "weight": "head.weight", "bias": "head.bias"}]
    assert meta["optimizer"] == {"name": "sgd", "lr": 0.0015, "momentum": 0.9, "dampening": 0.01,
                                 "weight_decay": 0.0, "nesterov": False}
    assert meta["optimizer_step"] == 0 and meta["training"]["steps"] == 0
    assert sorted(tod.tensors) == ["optim/head.bias/momentum_buffer", "optim/head.weight/momentum_buffer",
                                   "param/head.bias", "param/head.weight"]
    assert not tod.tensors["optim/head.weight/momentum_buffer"].any()
    w = tod.tensors["param/head.weight"]
    assert w.shape == (10, 1000) and abs(w.std() - 0.1) < 0.005 and not tod.tensors["param/head.bias"].any()


# ---- a tiny network: every supported head layer, and the error paths, in a second or two ----

class TinyBackbone(torch.nn.Module):
    """Conv + BN + ReLU + global pooling: (N, 3, 16, 16) -> (N, 8)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x))).mean((2, 3))


def _tiny(head: torch.nn.Module) -> TransferNet:
    torch.manual_seed(0)
    net = TransferNet(TinyBackbone(), head)
    net.backbone.bn.running_mean.uniform_(-0.5, 0.5)  # non-trivial BN statistics, to check the folding
    net.backbone.bn.running_var.uniform_(0.5, 2.0)
    return net


def _export_tiny(net: TransferNet, path: Path, **kw) -> str:
    return export(net, net.head.parameters(), input_shape=(3, 16, 16), batch_size=4,
                  preprocessing={"scale": 1.0, "mean": [0.0] * 3, "std": [1.0] * 3}, path=path, **kw)


@pytest.mark.parametrize("hidden", [None, 6])
def test_hidden_head_with_dropout_matches_torch(tmp_path, hidden):
    head = default_head(8, 3, seed=1, hidden=hidden, dropout=0.25)
    net = _tiny(head)
    out = convert(_export_tiny(net, tmp_path / "tiny.onnx"), tmp_path / "tiny")
    tod = load_file(out)
    ops = [layer["op"] for layer in tod.meta["head"]]
    assert ops == (["dense"] if hidden is None else ["dense", "relu", "dropout", "dense"])
    if hidden:
        assert tod.meta["head"][2]["p"] == pytest.approx(0.25)
    x = np.random.default_rng(0).normal(size=(5, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        want = net.eval()(torch.from_numpy(x)).numpy()
    _, got = tod_forward(out, x)
    assert np.abs(got - want).max() < 1e-5


def test_unsupported_op_in_head_is_named_and_nothing_written(tmp_path):
    net = _tiny(torch.nn.Sequential(torch.nn.Linear(8, 3), torch.nn.Tanh()))
    model = _export_tiny(net, tmp_path / "tanh.onnx")
    with pytest.raises(UserError, match=r"unsupported op Tanh in the trainable part \(node '[^']+'\)"):
        convert(model, tmp_path / "tanh")
    assert not (tmp_path / "tanh.tod").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["tanh.onnx"]  # no temp file left either


def _graph_model(head_nodes: list, head_inits: list, trainable: list[str], out_dim: int = 2) -> onnx.ModelProto:
    """data (N, 4) -> frozen Relu -> 'feat' (N, 4) -> head nodes -> 'logits', with edgetune metadata."""
    import json

    nodes = [helper.make_node("Relu", ["data"], ["feat"], name="frozen_relu"),
             helper.make_node("Neg", ["feat"], ["feat2"], name="frozen_neg"), *head_nodes]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", out_dim])],
        initializer=[numpy_helper.from_array(v if isinstance(v, np.ndarray) and v.dtype.kind in "bi"
                                             else np.asarray(v, np.float32), n) for n, v in head_inits])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    meta = {"trainable": trainable, "loss": "softmax_cross_entropy", "input": {"name": "data", "shape": [2, 4]},
            "output": "logits"}
    model.metadata_props.add(key="edgetune", value=json.dumps(meta))
    return model


def test_matmul_add_and_gemm_without_transb_become_dense_out_in():
    from edgetune.convert.split import split_head

    w = np.arange(8, dtype=np.float32).reshape(4, 2)  # (in, out) as MatMul/Gemm(transB=0) store it
    for nodes in ([helper.make_node("MatMul", ["feat", "w"], ["mm"], name="mm"),
                   helper.make_node("Add", ["b", "mm"], ["logits"], name="add")],
                  [helper.make_node("Gemm", ["feat", "w", "b"], ["logits"], name="gemm")]):
        head = split_head(_graph_model(nodes, [("w", w), ("b", [1.0, 2.0])], ["w", "b"]), ["w", "b"], "data", "logits")
        assert head.boundary == "feat"
        assert head.layers == [{"op": "dense", "weight": "w", "bias": "b"}]
        np.testing.assert_array_equal(head.params["w"], w.T)


@pytest.mark.parametrize("nodes, inits, match", [
    ([helper.make_node("Gemm", ["feat", "w"], ["logits"], name="g", alpha=2.0)], [("w", np.ones((4, 2)))],
     r"node 'g' \(Gemm\): only alpha=1"),
    ([helper.make_node("Gemm", ["feat", "w"], ["logits"], name="g", transA=1)], [("w", np.ones((4, 2)))],
     r"transA=1"),
    ([helper.make_node("MatMul", ["feat", "w"], ["mm"]), helper.make_node("Softmax", ["mm"], ["logits"], name="sm")],
     [("w", np.ones((4, 2)))], r"unsupported op Softmax in the trainable part \(node 'sm'\)"),
    ([helper.make_node("MatMul", ["feat", "w"], ["mm"], name="mm"),
      helper.make_node("Add", ["mm", "feat2"], ["logits"], name="skip")],
     [("w", np.ones((4, 2)))], r"exactly one tensor of the frozen part, it reads 2: \['feat', 'feat2'\]"),
    ([helper.make_node("MatMul", ["feat", "w"], ["mm"]), helper.make_node("Add", ["mm", "c"], ["logits"], name="a")],
     [("w", np.ones((4, 2))), ("c", np.ones(2).astype(bool))], r"constant 'c' of type bool"),
])
def test_head_errors_name_op_and_node(nodes, inits, match):
    from edgetune.convert.split import split_head

    with pytest.raises(UserError, match=match):
        split_head(_graph_model(nodes, inits, ["w"]), ["w"], "data", "logits")


def test_what_the_layer_list_cannot_hold_becomes_the_node_list():
    """A frozen bias or a reshape inside the trainable part: the node list (version 2.0) holds them as
    constants read by their nodes, named as in the graph; the cut becomes `features`, the output `logits`."""
    from edgetune.convert.split import split_head

    nodes = [helper.make_node("MatMul", ["feat", "w"], ["mm"], name="mm"),
             helper.make_node("Add", ["mm", "c"], ["added"], name="a"),
             helper.make_node("Reshape", ["added", "shape"], ["logits"], name="rs")]
    head = split_head(_graph_model(nodes, [("w", np.ones((4, 2))), ("c", np.ones(2)), ("shape", np.array([0, -1]))], ["w"]),
                      ["w"], "data", "logits")
    assert head.graph and head.boundary == "feat" and sorted(head.constants) == ["c", "shape"]
    assert head.layers[0] == {"op": "MatMul", "name": "mm", "inputs": ["features", "w"], "outputs": ["mm"],
                              "attributes": {}}
    assert head.layers[-1]["outputs"] == ["logits"]
    np.testing.assert_array_equal(head.params["w"], np.ones((4, 2)))  # the node list keeps ONNX's layout


def test_an_op_the_engine_cannot_differentiate_fails_convert_naming_it_and_writes_nothing(tmp_path):
    nodes = [helper.make_node("MatMul", ["feat", "w"], ["mm"], name="mm"),
             helper.make_node("Softmax", ["mm"], ["logits"], name="the_softmax")]
    onnx.save(_graph_model(nodes, [("w", np.ones((4, 2)))], ["w"]), tmp_path / "train.onnx")
    with pytest.raises(UserError, match=r"unsupported op Softmax in the trainable part \(node 'the_softmax'\)"):
        convert(tmp_path / "train.onnx", tmp_path / "model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.onnx"]


def test_plain_onnx_is_refused_with_a_hint(tmp_path):
    model = _graph_model([helper.make_node("MatMul", ["feat", "w"], ["logits"])], [("w", np.ones((4, 2)))], ["w"])
    del model.metadata_props[:]
    onnx.save(model, tmp_path / "plain.onnx")
    with pytest.raises(UserError, match="--backbone-onnx"):
        convert(tmp_path / "plain.onnx", tmp_path / "plain")


@pytest.fixture(scope="module")
def tiny_backbone_onnx(tmp_path_factory) -> Path:
    """A plain ONNX backbone (no edgetune metadata), exported from the tiny torch backbone."""
    path = tmp_path_factory.mktemp("bb") / "tiny_backbone.onnx"
    net = _tiny(torch.nn.Identity()).backbone.eval()
    prog = torch.onnx.export(net, (torch.zeros(2, 3, 16, 16),), dynamo=True, input_names=["image"],
                             output_names=["pooled"], opset_version=18,
                             dynamic_shapes=({0: torch.export.Dim("batch")},))
    prog.save(path)
    return path


def test_convert_backbone_adds_seeded_default_head(tiny_backbone_onnx, tmp_path):
    out = convert_backbone(tiny_backbone_onnx, "pooled", 3, tmp_path / "bb", preprocessing="imagenet", seed=7,
                           class_names=["a", "b", "c"], batch_size=4)
    assert out == tod_path(tmp_path / "bb") == str(tmp_path / "bb.tod")
    tod = load_file(out)
    w = np.random.default_rng(7).normal(0.0, 0.1, (3, 8)).astype(np.float32)
    np.testing.assert_array_equal(tod.tensors["param/head.weight"], w)
    assert tod.meta["preprocessing"]["scale"] == pytest.approx(1 / 255)
    assert tod.meta["input"] == {"name": "image", "shape": [4, 3, 16, 16], "dtype": "float32"}
    assert tod.meta["class_names"] == ["a", "b", "c"] and tod.meta["frozen"]["features"] == 8
    x = np.random.default_rng(1).normal(size=(2, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        want = _tiny(torch.nn.Identity()).backbone.eval()(torch.from_numpy(x)).numpy()
    features, logits = tod_forward(out, x)
    assert np.abs(features - want).max() < 1e-5
    np.testing.assert_allclose(logits, features @ w.T, atol=1e-6)


def test_convert_backbone_missing_cut_lists_close_names(tiny_backbone_onnx, tmp_path):
    with pytest.raises(UserError, match=r"tensor 'pooledd' is not in the graph; close names: .*pooled"):
        convert_backbone(tiny_backbone_onnx, "pooledd", 3, tmp_path / "x")
    assert not (tmp_path / "x.tod").exists()


def test_convert_backbone_cut_must_be_per_image_vector(tiny_backbone_onnx, tmp_path):
    model = onnx.load(tiny_backbone_onnx)
    conv_out = next(n.output[0] for n in model.graph.node if n.op_type == "Conv")
    with pytest.raises(UserError, match=r"must be \(N, features\)"):
        convert_backbone(tiny_backbone_onnx, conv_out, 3, tmp_path / "x")


def test_cli_convert_backbone_onnx(tiny_backbone_onnx, tmp_path, capsys):
    from edgetune.cli.main import main

    (tmp_path / "classes.txt").write_text("0\tshirt\n1\tboot\n", encoding="utf-8")
    code = main(["convert", "--backbone-onnx", str(tiny_backbone_onnx), "--cut", "pooled", "--class-names-from",
                 str(tmp_path / "classes.txt"), "--preprocessing", "imagenet", "--optimizer", "adam", "--lr", "0.01",
                 "--batch-size", "8", "--output", str(tmp_path / "bb.tod")])
    assert code == 0 and capsys.readouterr().out.strip() == f"wrote {tmp_path / 'bb.tod'}"
    meta = load_file(tmp_path / "bb.tod").meta
    assert meta["class_names"] == ["shirt", "boot"] and meta["num_classes"] == 2 and meta["batch_size"] == 8
    assert meta["optimizer"] == {"name": "adam", "lr": 0.01, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}
    assert meta["backbone"] == "tiny_backbone" and meta["preprocessing"]["std"] == [0.229, 0.224, 0.225]


def test_runtime_sgd_steps_equal_torch_sgd_steps(lite0_tod, images, tmp_path):
    """Export + convert keep the training semantics: two SGD steps on the device = two torch SGD steps."""
    backbone, info = create_backbone("efficientnet-lite0")
    net = TransferNet(backbone, default_head(info.features, 10, seed=0)).eval()
    labels = np.array([0, 3, 9, 3, 7])
    opt = torch.optim.SGD(net.head.parameters(), lr=0.0015, momentum=0.9, dampening=0.01, weight_decay=0.0)
    with torch.no_grad():
        features = net.backbone(torch.from_numpy(images))
    want_losses = []
    for _ in range(2):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net.head(features), torch.from_numpy(labels))
        loss.backward()
        opt.step()
        want_losses.append(loss.item())
    sess = TrainSession.create(lite0_tod).train()
    losses = [float(sess.run_graph(images, labels)["loss"]) for _ in range(2)]
    np.testing.assert_allclose(losses, want_losses, atol=1e-5)
    tod = load_file(sess.save(tmp_path / "stepped.tod"))
    assert np.abs(tod.tensors["param/head.weight"] - net.head.weight.detach().numpy()).max() < 1e-6
    assert np.abs(tod.tensors["param/head.bias"] - net.head.bias.detach().numpy()).max() < 1e-6
    assert tod.meta["optimizer_step"] == 2
