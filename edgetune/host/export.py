"""`export()`: a TransferNet to an ONNX training graph with its training metadata.

The graph is the forward pass `data -> logits` (dynamo exporter, opset 18, dynamic batch). The
backbone is exported in eval mode, so BatchNorm uses its running statistics (convert folds it into
the convolutions); the head in train mode, so its Dropout stays a Dropout node. The exporter's own
optimizer is off: it would fold an all-zero bias, such as the default head's, out of the graph.

What makes it a *training* graph is the JSON in the model's `metadata_props["edgetune"]`: which
initializers train, the loss, the optimizer and its hyper-parameters, batch size, input and label
specs, class names and preprocessing. `edgetune convert` reads both and writes the `.tod`.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from edgetune import __version__
from edgetune.convert.spec import METADATA_KEY, SGD, Adam, check_loss
from edgetune.errors import UserError
from edgetune.host.net import TransferNet
from edgetune.runtime.atomic import write_atomic

INPUT_NAME, OUTPUT_NAME, LABEL_NAME = "data", "logits", "label"


def export(net: nn.Module, trainable: Iterable[nn.Parameter | str], loss: str = "softmax_cross_entropy",
           optimizer: SGD | Adam = SGD(), batch_size: int = 32, input_shape: Sequence[int] = (3, 224, 224),
           class_names: Sequence[str] | None = None, preprocessing: dict[str, Any] | None = None,
           path: str | os.PathLike = "transfer_learning_tod.onnx", backbone_name: str | None = None) -> str:
    """Export `net` as an ONNX training graph (forward graph + training metadata), atomically.

    Args:
        net: usually a `TransferNet`; any module mapping (N, *input_shape) to (N, classes) logits.
        trainable: the parameters the device trains (objects or names from `net.named_parameters()`).
        loss: the training loss; only `softmax_cross_entropy` (mean over the batch, one-hot labels).
        optimizer: `SGD(...)` or `Adam(...)` with its hyper-parameters.
        batch_size: the training batch size (the frozen part still runs any batch size).
        input_shape: `(C, H, W)` of one image.
        class_names: one name per output class; default `"0"`, `"1"`, ...
        preprocessing: the `meta.preprocessing` object; default: the one the registry backbone
            (`net.backbone.backbone_info`) declares. Required for any other backbone.
        path: the `.onnx` file to write.
        backbone_name: recorded in the model; default: the registry name, else the backbone's class.

    Returns:
        The path written.

    Raises:
        UserError: unknown trainable names, wrong class names, missing preprocessing, bad optimizer
            settings or loss.
    """
    path = os.fspath(path)
    names = _trainable_names(net, trainable)
    check_loss(loss)
    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}")
    info = getattr(getattr(net, "backbone", None), "backbone_info", None)
    if preprocessing is None:
        if info is None:
            raise UserError("this backbone is not from the registry: pass preprocessing= (see docs/FORMAT.md)")
        preprocessing = info.preprocessing
    if backbone_name is None:
        backbone_name = info.name if info is not None else type(getattr(net, "backbone", net)).__name__
    dummy = torch.zeros(2, *input_shape)
    modes = {m: m.training for m in net.modules()}
    try:
        net.eval()
        with torch.no_grad():
            out = net(dummy)
        if out.dim() != 2:
            raise UserError(f"the network must output (N, classes) logits, got shape {tuple(out.shape)}")
        num_classes = int(out.shape[1])
        class_names = [str(i) for i in range(num_classes)] if class_names is None else [str(c) for c in class_names]
        if len(class_names) != num_classes:
            raise UserError(f"{len(class_names)} class names for a network with {num_classes} outputs")
        meta = {
            "format": "edgetune-training-graph", "version": 1, "created_by": f"edgetune {__version__}",
            "backbone": backbone_name, "trainable": names, "loss": loss, "optimizer": optimizer.to_meta(),
            "batch_size": int(batch_size), "num_classes": num_classes, "class_names": class_names,
            "input": {"name": INPUT_NAME, "shape": [int(batch_size), *map(int, input_shape)], "dtype": "float32"},
            "output": OUTPUT_NAME,
            "label": {"name": LABEL_NAME, "shape": [int(batch_size), num_classes], "dtype": "float32",
                      "encoding": "one-hot"},
            "preprocessing": preprocessing,
        }
        if isinstance(net, TransferNet):
            net.head.train()  # keeps Dropout as a node; the backbone stays in eval mode (BN folded)
        model = _to_onnx(net, dummy)
    finally:
        for m, training in modes.items():
            m.train(training)
    missing = sorted(set(names) - {init.name for init in model.graph.initializer})
    if missing:
        raise RuntimeError(f"exporter renamed trainable parameters {missing}; cannot mark them trainable")
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta, sort_keys=True)
    return write_atomic(path, model.SerializeToString())


def _trainable_names(net: nn.Module, trainable: Iterable[nn.Parameter | str]) -> list[str]:
    by_id = {id(p): n for n, p in net.named_parameters()}
    known = set(by_id.values())
    names = []
    for t in trainable:
        name = t if isinstance(t, str) else by_id.get(id(t))
        if name is None:
            raise UserError("a trainable parameter is not a parameter of the network")
        if name not in known:
            raise UserError(f"{name!r} is not a parameter of the network")
        names.append(name)
    if not names:
        raise UserError("no trainable parameters given")
    return sorted(set(names))


def _to_onnx(net: nn.Module, dummy: torch.Tensor) -> Any:
    print("exporting with torch.onnx (dynamo, opset 18)...", file=sys.stderr)
    batch = torch.export.Dim("batch")
    with contextlib.redirect_stdout(sys.stderr):  # the exporter's progress lines are not our output
        program = torch.onnx.export(net, (dummy,), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    opset_version=18, dynamic_shapes=({0: batch},), verbose=False,
                                    optimize=False)  # its optimizer drops an all-zero (trainable) bias
    return program.model_proto
