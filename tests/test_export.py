"""Export (host): backbone registry, default head, the ONNX training graph and its metadata, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from edgetune.cli.main import main
from edgetune.errors import UserError
from edgetune.host import Adam, TransferNet, backbones, create_backbone, default_head, export
from edgetune.runtime.format import load_file


def _meta(path: str | Path) -> dict:
    model = onnx.load(path, load_external_data=False)
    return json.loads(next(p.value for p in model.metadata_props if p.key == "edgetune"))


def test_unknown_backbone_lists_known_ones():
    with pytest.raises(UserError, match="unknown backbone 'resnet50'; known: efficientnet-b0, efficientnet-lite0, "
                                        "efficientnet-lite0-features"):
        create_backbone("resnet50")


def test_lite0_features_is_the_pooled_1280_vector_of_lite0():
    lite0, info = create_backbone("efficientnet-lite0")
    feats, finfo = create_backbone("efficientnet-lite0-features")
    assert (info.features, finfo.features) == (1000, 1280) and finfo.preprocessing == info.preprocessing
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        f = feats(x)
        # lite0's classifier applied to the pooled features gives lite0's logits (dropout is off in eval)
        np.testing.assert_allclose(lite0._fc(f).numpy(), lite0(x).numpy(), atol=1e-4)
    assert f.shape == (2, 1280)


def test_b0_without_network_says_to_pass_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(backbones, "B0_URL", "http://127.0.0.1:9/efficientnet-b0-355c32eb.pth")  # refused at once
    monkeypatch.setattr(backbones, "CACHE_DIR", tmp_path / "cache")
    with pytest.raises(UserError, match=r"cannot download http://127\.0\.0\.1:9/.*pass --weights FILE"):
        create_backbone("efficientnet-b0")
    assert list((tmp_path / "cache").iterdir()) == []  # no partial download left


@pytest.fixture(scope="module")
def b0_weights(tmp_path_factory) -> Path:
    """A state dict of the B0 architecture (random values: the real file needs the network)."""
    from efficientnet_lite_pytorch import EfficientNet

    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("b0") / "b0.pth"
    torch.save(EfficientNet.from_name("efficientnet-b0").state_dict(), path)
    return path


def test_b0_loads_a_local_weights_file(b0_weights):
    net, info = create_backbone("efficientnet-b0", weights=b0_weights)
    want = torch.load(b0_weights, weights_only=True)
    for name, value in net.state_dict().items():
        assert torch.equal(value, want[name]), name
    assert info.features == 1000 and not net.training
    assert info.preprocessing["scale"] == pytest.approx(1 / 255) and info.preprocessing["mean"] == [0.485, 0.456, 0.406]


def test_weights_file_errors(tmp_path, b0_weights):
    with pytest.raises(UserError, match="does not fit this backbone"):
        create_backbone("efficientnet-lite0", weights=b0_weights)
    with pytest.raises(UserError, match="does not exist"):
        create_backbone("efficientnet-b0", weights=tmp_path / "nope.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not a PyTorch weights file"):
        create_backbone("efficientnet-b0", weights=junk)
    code = tmp_path / "code.pth"
    torch.save({"x": Path("/")}, code)  # any pickled object: refused by weights_only=True, never executed
    with pytest.raises(UserError, match="not a PyTorch weights file"):
        create_backbone("efficientnet-b0", weights=code)


def test_default_head_is_seeded_normal_0_01_with_zero_bias():
    a, b, c = default_head(1000, 10, seed=5), default_head(1000, 10, seed=5), default_head(1000, 10, seed=6)
    assert isinstance(a, torch.nn.Linear) and a.weight.shape == (10, 1000)
    assert torch.equal(a.weight, b.weight) and not torch.equal(a.weight, c.weight)
    assert abs(a.weight.std().item() - 0.1) < 0.005 and abs(a.weight.mean().item()) < 0.005
    assert not a.bias.any()
    hidden = default_head(8, 3, hidden=5, dropout=0.5)
    assert [type(m).__name__ for m in hidden] == ["Linear", "ReLU", "Dropout", "Linear"]


def test_lite0_training_graph_metadata(lite0_onnx):
    meta = _meta(lite0_onnx)
    assert meta["trainable"] == ["head.bias", "head.weight"] and meta["backbone"] == "efficientnet-lite0"
    assert meta["loss"] == "softmax_cross_entropy" and meta["batch_size"] == 32
    assert meta["optimizer"] == {"name": "sgd", "lr": 0.0015, "momentum": 0.9, "dampening": 0.01,
                                 "weight_decay": 0.0, "nesterov": False}
    assert meta["input"] == {"name": "data", "shape": [32, 3, 224, 224], "dtype": "float32"}
    assert meta["label"] == {"name": "label", "shape": [32, 10], "dtype": "float32", "encoding": "one-hot"}
    assert meta["class_names"] == [str(i) for i in range(10)]
    assert meta["preprocessing"]["scale"] == 1.0 and meta["preprocessing"]["mean"] == [127.0] * 3
    model = onnx.load(lite0_onnx)
    assert [(o.domain, o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")] == [("", 18)]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    assert {"head.weight", "head.bias"} <= {i.name for i in model.graph.initializer}


class Tiny(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3))


def test_export_errors(tmp_path):
    net = TransferNet(Tiny(), default_head(3, 2))
    with pytest.raises(UserError, match="pass preprocessing="):
        export(net, net.head.parameters(), input_shape=(3, 8, 8), path=tmp_path / "a.onnx")
    pre = {"scale": 1.0, "mean": [0.0] * 3, "std": [1.0] * 3}
    with pytest.raises(UserError, match="3 class names for a network with 2 outputs"):
        export(net, ["head.weight"], input_shape=(3, 8, 8), preprocessing=pre, class_names="abc",
               path=tmp_path / "a.onnx")
    with pytest.raises(UserError, match="'head.w' is not a parameter"):
        export(net, ["head.w"], input_shape=(3, 8, 8), preprocessing=pre, path=tmp_path / "a.onnx")
    with pytest.raises(UserError, match="unknown loss 'mse'"):
        export(net, ["head.weight"], loss="mse", input_shape=(3, 8, 8), preprocessing=pre, path=tmp_path / "a.onnx")
    assert list(tmp_path.iterdir()) == []


def test_adam_export_and_convert_give_adam_state(tmp_path):
    from edgetune.convert import convert

    net = TransferNet(Tiny(), default_head(3, 2, seed=1))
    path = export(net, net.head.parameters(), optimizer=Adam(lr=0.01, betas=(0.8, 0.9)), input_shape=(3, 8, 8),
                  batch_size=4, preprocessing={"scale": 1.0, "mean": [0.0] * 3, "std": [1.0] * 3},
                  class_names=["cat", "dog"], path=tmp_path / "adam.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["adam.onnx"]  # atomic: no temp file left
    assert _meta(path)["optimizer"] == {"name": "adam", "lr": 0.01, "betas": [0.8, 0.9], "eps": 1e-8,
                                        "weight_decay": 0.0}
    tod = load_file(convert(path, tmp_path / "adam"))
    assert sorted(tod.tensors) == ["optim/head.bias/exp_avg", "optim/head.bias/exp_avg_sq", "optim/head.weight/exp_avg",
                                   "optim/head.weight/exp_avg_sq", "param/head.bias", "param/head.weight"]
    np.testing.assert_array_equal(tod.tensors["param/head.weight"], net.head.weight.detach().numpy())
    assert tod.meta["class_names"] == ["cat", "dog"] and tod.meta["frozen"]["features"] == 3


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_errors_are_one_line_exit_2(tmp_path, capsys):
    classes = tmp_path / "classes.txt"
    classes.write_text("0\tcat\n1\tdog\n", encoding="utf-8")
    for argv, match in [
        (["export", "--backbone", "nope", "--num-classes", "2"], "unknown backbone 'nope'"),
        (["export", "--num-classes", "3", "--class-names-from", str(classes)], "lists 2 classes"),
        (["export"], "give --num-classes"),
        (["export", "--num-classes", "2", "--optimizer", "adam", "--betas", "0.9", "1.5"], "betas"),
        (["convert", "--backbone-onnx", str(tmp_path / "x.onnx"), "--num-classes", "2"], "needs --cut"),
        (["convert", "--model", str(tmp_path / "missing.onnx")], "does not exist"),
    ]:
        code, out, err = _cli(argv, capsys)
        assert code == 2 and out == "", argv
        assert len(err.strip().splitlines()) == 1 and match in err, (argv, err)


@pytest.mark.slow
def test_cli_export_then_convert(tmp_path, capsys):
    classes = tmp_path / "classes.txt"
    classes.write_text("0\talley\n1\tcockpit\n2\tattic\n", encoding="utf-8")
    onnx_path = tmp_path / "feat.onnx"
    code, out, _ = _cli(["export", "--backbone", "efficientnet-lite0-features", "--class-names-from", str(tmp_path),
                         "--batch-size", "16", "--optimizer", "sgd", "--lr", "0.01", "--momentum", "0.8",
                         "--dampening", "0", "--nesterov", "--weight-decay", "0.001", "--seed", "4",
                         "-o", str(onnx_path)], capsys)
    assert code == 0 and out.startswith(f"wrote {onnx_path}")
    code, out, _ = _cli(["convert", "--model", str(onnx_path), "--output", str(tmp_path / "feat")], capsys)
    assert code == 0 and out.strip() == f"wrote {tmp_path / 'feat.tod'}"
    tod = load_file(tmp_path / "feat.tod")
    assert tod.meta["class_names"] == ["alley", "cockpit", "attic"] and tod.meta["batch_size"] == 16
    assert tod.meta["frozen"]["features"] == 1280 and tod.meta["backbone"] == "efficientnet-lite0-features"
    assert tod.meta["optimizer"] == {"name": "sgd", "lr": 0.01, "momentum": 0.8, "dampening": 0.0,
                                     "weight_decay": 0.001, "nesterov": True}
    np.testing.assert_array_equal(tod.tensors["param/head.weight"], default_head(1280, 3, seed=4).weight.detach())


@pytest.fixture()
def http_dir(tmp_path):
    """A local HTTP server over a directory: the real urllib download path, without the internet."""
    import functools
    import http.server
    import threading

    root = tmp_path / "www"
    root.mkdir()
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_checks_the_hash_in_the_file_name_and_caches(http_dir, tmp_path):
    import hashlib

    root, url = http_dir
    payload = b"weights" * 1000
    good = f"w-{hashlib.sha256(payload).hexdigest()[:8]}.pth"
    (root / good).write_bytes(payload)
    (root / "w-deadbeef.pth").write_bytes(payload)
    cache = tmp_path / "cache"
    path = backbones.download(f"{url}/{good}", cache)
    assert Path(path).read_bytes() == payload
    (root / good).unlink()  # cached now: no second request
    assert backbones.download(f"{url}/{good}", cache) == path
    with pytest.raises(UserError, match="do not match the hash deadbeef"):
        backbones.download(f"{url}/w-deadbeef.pth", cache)
    with pytest.raises(UserError, match=r"\(HTTP 404 File not found\).*pass --weights FILE"):
        backbones.download(f"{url}/missing-0123abcd.pth", cache)
    assert sorted(p.name for p in cache.iterdir()) == [good]
