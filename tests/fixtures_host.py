"""Shared pytest fixtures for the host layer's tests: the seed's model, exported and converted once per run."""

from __future__ import annotations

from pathlib import Path

import pytest

NUM_CLASSES = 10
BATCH_SIZE = 32


@pytest.fixture(scope="session")
def lite0_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The seed's training graph: EfficientNet-Lite0 (1000 logits) + Dense(1000, 10), SGD defaults, seed 0."""
    from edgetune.host import SGD, TransferNet, create_backbone, default_head, export

    backbone, info = create_backbone("efficientnet-lite0")
    net = TransferNet(backbone, default_head(info.features, NUM_CLASSES, seed=0))
    path = tmp_path_factory.mktemp("host") / "transfer_learning_tod.onnx"
    return Path(export(net, net.head.parameters(), optimizer=SGD(), batch_size=BATCH_SIZE,
                       class_names=[str(i) for i in range(NUM_CLASSES)], path=path))


@pytest.fixture(scope="session")
def lite0_tod(lite0_onnx: Path) -> Path:
    """`lite0_onnx` converted to a `.tod` (fresh: optimizer state zero, step 0). Read-only: copy it to change it."""
    from edgetune.convert import convert

    return Path(convert(lite0_onnx, lite0_onnx.with_suffix("")))
