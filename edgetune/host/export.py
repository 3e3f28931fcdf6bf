"""`export()`: a TransferNet to an ONNX training graph with its training metadata.

The graph is the forward pass `data -> logits` (dynamo exporter, opset 18, dynamic batch). The
backbone is exported in eval mode, so BatchNorm uses its running statistics (a BatchNormalization
node with `training_mode=0`: the frozen part's are folded into the convolutions by convert, the
trainable part's stay nodes whose scale and shift train; with `batch_statistics` the trainable
part's become `training_mode=1`, see `_use_batch_statistics`); the head in train mode, so its Dropout
stays a Dropout node. The exporter's own optimizer is off: it would fold an all-zero bias, such as
the default head's, out of the graph. Instead `_clean_trainable_part` rewrites the few exporter
idioms inside the trainable part into the ops the device trains (see there).

What makes it a *training* graph is the JSON in the model's `metadata_props["edgetune"]`: which
initializers train (and, with `trainable=` deeper than the head, which are buffers and at which
learning-rate scale each group trains), the loss, the optimizer and its hyper-parameters, batch
size, input and label specs, class names and preprocessing. `edgetune convert` reads both and
writes the `.tod`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from edgetune import __version__
from edgetune.convert.spec import METADATA_KEY, Algorithm, check_loss
from edgetune.convert.split import depends_on
from edgetune.errors import UserError
from edgetune.host.net import TransferNet
from edgetune.host.trainable import HEAD, Selection, select
from edgetune.runtime.atomic import write_atomic
from edgetune.runtime.meta import check_mixup, check_schedule

INPUT_NAME, OUTPUT_NAME, LABEL_NAME = "data", "logits", "label"


def export(net: nn.Module, trainable: str | Iterable[nn.Parameter | str] = HEAD, loss: str = "softmax_cross_entropy",
           optimizer: Algorithm | None = None, batch_size: int = 32, input_shape: Sequence[int] = (3, 224, 224),
           class_names: Sequence[str] | None = None, preprocessing: dict[str, Any] | None = None,
           path: str | os.PathLike = "transfer_learning_tod.onnx", backbone_name: str | None = None,
           backbone_lr_scale: float | None = None, schedule: str | None = None,
           mixup: float | None = None, batch_statistics: bool | None = None) -> str:
    """Export `net` as an ONNX training graph (forward graph + training metadata), atomically.

    Args:
        net: usually a `TransferNet`; any module mapping (N, *input_shape) to (N, classes) logits.
        trainable: what the device trains: a choice (`"head"`, the default; `"last-block"`,
            `"last-stage"`: see `edgetune.host.trainable`) or comma-separated module names, as a
            string; or the parameters themselves (objects or names from `net.named_parameters()`).
        loss: the training loss; only `softmax_cross_entropy` (mean over the batch, one-hot labels).
        optimizer: `SGD(...)` or `Adam(...)` with its hyper-parameters; default: the choice's recipe
            (`RECIPES`; the head's is the seed's SGD).
        backbone_lr_scale: the learning-rate factor of the pretrained parameters that train
            (written as `param_groups`); default: the choice's recipe.
        schedule: the learning-rate schedule `net_runner` follows over a run unless told otherwise
            (`constant`, `cosine`, `step`; written as `schedule` when not constant); default: the
            choice's recipe.
        mixup: the strength (alpha) of mixup at the cut the device trains with unless told otherwise
            (`edgetune.runtime.mixup`; 0: off; written as `mixup` when not 0); default: the choice's
            recipe.
        batch_statistics: whether the trainable part's BatchNorm normalises with each training batch's
            own statistics and moves its running statistics towards them (`training_mode=1`), instead
            of normalising with the pretrained running statistics; default: the choice's recipe.
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
    selection = select(net, trainable) if isinstance(trainable, str) else _selection(net, trainable)
    names = selection.params
    recipe = selection.recipe
    optimizer = recipe.optimizer if optimizer is None else optimizer
    lr_scale = recipe.backbone_lr_scale if backbone_lr_scale is None else backbone_lr_scale
    if not lr_scale > 0:
        raise UserError(f"backbone learning-rate scale must be > 0, got {lr_scale}")
    schedule = check_schedule(recipe.schedule if schedule is None else schedule)
    mixup = check_mixup(recipe.mixup if mixup is None else mixup)
    explicit_statistics = batch_statistics is not None
    batch_statistics = recipe.batch_statistics if batch_statistics is None else bool(batch_statistics)
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
        if schedule != "constant":  # absent means constant: the seed's files stay as they were
            meta["schedule"] = schedule
        if mixup:  # absent means off
            meta["mixup"] = mixup
        if selection.backbone:
            meta["trainable_choice"] = selection.choice
            meta["param_groups"] = selection.param_groups(lr_scale)
        if isinstance(net, TransferNet):
            net.head.train()  # keeps Dropout as a node; the backbone stays in eval mode (BN: running statistics)
        model = _to_onnx(net, dummy)
    finally:
        for m, training in modes.items():
            m.train(training)
    missing = sorted(set(names) - {init.name for init in model.graph.initializer})
    if missing:
        raise RuntimeError(f"exporter renamed trainable parameters {missing}; cannot mark them trainable")
    if selection.backbone:
        _clean_trainable_part(model, names)
        meta["buffers"] = _buffers(model, names, {n for n, _ in net.named_buffers()})
    if batch_statistics and not _use_batch_statistics(model, names) and explicit_statistics:
        raise UserError(f"batch statistics: the trainable part ({selection.choice}) has no BatchNormalization")
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta, sort_keys=True)
    return write_atomic(path, model.SerializeToString())


def _selection(net: nn.Module, trainable: Iterable[nn.Parameter | str]) -> Selection:
    """The parameters given as objects or names; the choice is `head` when they are exactly the head's."""
    names = _trainable_names(net, trainable)
    head = [n for n, _ in net.named_parameters() if n.startswith(HEAD + ".")]
    backbone = [n for n in names if n not in set(head)] if head else []
    return Selection(HEAD if names == sorted(head) else "custom", names, backbone)


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
    with contextlib.redirect_stdout(sys.stderr), _quiet_exporter():  # its progress lines are not our output
        program = torch.onnx.export(net, (dummy,), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    opset_version=18, dynamic_shapes=({0: batch},), verbose=False,
                                    optimize=False)  # its optimizer drops an all-zero (trainable) bias
    return program.model_proto


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Hide two messages of torch's exporter that say nothing about the user's model: that
    torchvision's detection ops are not registered (we export none), and a deprecation inside
    torch's own pytree code. Anything else it warns about still shows."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                    category=FutureWarning)
            yield
    finally:
        registration.setLevel(level)


def _buffers(model: onnx.ModelProto, trainable: list[str], torch_buffers: set[str]) -> list[str]:
    """The torch buffers (BatchNorm running statistics) the trainable part reads: state, not parameters."""
    read = {i for node in depends_on(model.graph, set(trainable)) for i in node.input}
    return sorted(read & torch_buffers & {init.name for init in model.graph.initializer})


# PyTorch's default BatchNorm momentum (0.1) in ONNX's convention. Lite0's own (0.01, as the TF
# original) moves the running statistics too slowly for a short run: after 60 steps on the demo's
# data they still hold 55% of ImageNet's, and a last-block model tested at 0.47 instead of 0.88
BN_MOMENTUM = 0.9


def _use_batch_statistics(model: onnx.ModelProto, trainable: list[str]) -> int:
    """Make the trainable part's BatchNormalization nodes normalise with batch statistics; their count.

    A node with `training_mode=1` normalises a training batch with the batch's own mean and variance
    and moves the running statistics (its buffers) towards them with `momentum` (`BN_MOMENTUM`);
    evaluation and the inference export normalise with the running statistics. For data far from
    ImageNet the pretrained statistics are those of other images; this lets the block adapt them.
    """
    nodes = [n for n in depends_on(model.graph, set(trainable)) if n.op_type == "BatchNormalization"]
    for node in nodes:
        kept = [a for a in node.attribute if a.name not in ("momentum", "training_mode")]
        del node.attribute[:]
        node.attribute.extend([*kept, onnx.helper.make_attribute("momentum", BN_MOMENTUM),
                               onnx.helper.make_attribute("training_mode", 1)])
        if len(node.output) == 1:  # ONNX: a training-mode node also outputs the updated running statistics
            node.output.extend([f"{node.output[0]}_running_mean", f"{node.output[0]}_running_var"])
    return len(nodes)


def _clean_trainable_part(model: onnx.ModelProto, trainable: list[str]) -> None:
    """Rewrite the exporter's idioms inside the trainable part into the ops the device trains, in place.

    The dynamo exporter with its optimizer off leaves, in a fine-tuned backbone block:
    - constant sub-expressions: a zero bias built as `Expand(0, Shape(weight))` for every bias-free
      Conv, Clip bounds as `CastLike(constant, x)`, ReduceMean's axes as a `Reshape` of constants:
      folded to initializers (a `Shape` of a trainable weight is constant: its shape never changes);
    - TF-"same" padding as a `Pad` node before the Conv: folded into the Conv's `pads`;
    - a Conv bias that is all zeros and not trainable: dropped (PyTorch's `bias=False`);
    - `x.view(batch, -1)` as a `Reshape` whose shape is computed from the input's batch size
      (a second tensor crossing from the frozen part): `Flatten(axis=1)` when the shapes say
      that is what it is.
    Nodes and initializers nothing reads any more are removed. Only the trainable part changes;
    the frozen part is the converter's to optimize.
    """
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    trainable_set = set(trainable)
    consts: dict[str, np.ndarray] = {n: numpy_helper.to_array(t) for n, t in inits.items() if n not in trainable_set}
    for node in graph.node:
        if node.op_type == "Constant":
            consts[node.output[0]] = _evaluate(node, {})
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.value_info, *graph.input, *graph.output)}
    producers = {o: n for n in graph.node for o in n.output}
    constant = set(consts)  # tensors whose value does not depend on the input or on trainable values
    for node in graph.node:
        if _constant(node, constant, inits, types):
            constant.update(node.output)
    region = depends_on(graph, trainable_set)
    in_region = {n.output[0] for n in region}
    folded: set[str] = set()

    def value(name: str) -> np.ndarray:
        if name not in consts:
            node = producers[name]
            consts[name] = _fold(node, [value(i) if i in constant else None for i in node.input], inits, types)
            folded.add(name)
        return consts[name]

    for node in region:
        for name in (*node.input, *node.output):
            if name in constant:
                value(name)
    nodes = [_copy(n) for n in graph.node if not (n.output and n.output[0] in folded)]
    shapes = {v.name: v.type.tensor_type.shape for v in (*graph.value_info, *graph.input)}
    producers = {o: n for n in nodes for o in n.output}
    consumers: dict[str, int] = {}
    for n in nodes:
        for i in n.input:
            consumers[i] = consumers.get(i, 0) + 1
    dropped: set[str] = set()  # first outputs of the Pad nodes folded away
    for node in nodes:
        if node.output[0] not in in_region:
            continue
        if node.op_type == "Conv":
            pad = producers.get(node.input[0])
            if pad is not None and pad.op_type == "Pad" and consumers.get(pad.output[0]) == 1 and \
                    _fold_pad(pad, node, consts):
                dropped.add(pad.output[0])
            if len(node.input) > 2 and node.input[2] in consts and node.input[2] not in trainable_set \
                    and not consts[node.input[2]].any():
                del node.input[2]
        elif node.op_type == "Reshape" and node.input[1] not in consts and \
                _is_flatten(shapes.get(node.input[0]), shapes.get(node.output[0])):
            node.CopyFrom(onnx.helper.make_node("Flatten", [node.input[0]], list(node.output), name=node.name, axis=1))
    nodes = _live([n for n in nodes if n.output[0] not in dropped], {o.name for o in graph.output})
    used = {i for n in nodes for i in n.input}
    new_inits = [_copy(i) for i in graph.initializer if i.name in used]
    new_inits += [numpy_helper.from_array(consts[name], name) for name in sorted(folded & used)]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(new_inits)
    live = {o for n in nodes for o in n.output} | {i.name for i in graph.input}
    kept_info = [v for v in graph.value_info if v.name in live]
    del graph.value_info[:]
    graph.value_info.extend(kept_info)


def _copy(message: Any) -> Any:
    out = type(message)()
    out.CopyFrom(message)
    return out


def _evaluate(node: onnx.NodeProto, inputs: dict[str, np.ndarray]) -> np.ndarray:
    from onnx.reference import ReferenceEvaluator

    return np.asarray(ReferenceEvaluator(node).run(None, inputs)[0])


def _constant(node: onnx.NodeProto, constant: set[str], inits: dict[str, onnx.TensorProto],
              types: dict[str, int]) -> bool:
    """Whether the node's output is the same whatever the input and the trainable weights' values."""
    if len(node.output) != 1:
        return False
    if node.op_type == "Shape":
        return node.input[0] in inits  # a weight's shape never changes
    if node.op_type == "CastLike":
        return node.input[0] in constant and node.input[1] in types  # only the second input's type matters
    return all(i in constant for i in node.input if i)


def _fold(node: onnx.NodeProto, inputs: list[np.ndarray | None], inits: dict[str, onnx.TensorProto],
          types: dict[str, int]) -> np.ndarray:
    """The value of a node `_constant` accepted, from its inputs' values (None where only a type or shape counts)."""
    if node.op_type == "Shape":
        dims = np.array(inits[node.input[0]].dims, dtype=np.int64)
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        return dims[attrs.get("start", 0):attrs.get("end", len(dims))]
    if node.op_type == "CastLike":
        return inputs[0].astype(onnx.helper.tensor_dtype_to_np_dtype(types[node.input[1]]))
    return _evaluate(node, {i: v for i, v in zip(node.input, inputs, strict=True) if i})


def _fold_pad(pad: onnx.NodeProto, conv: onnx.NodeProto, consts: dict[str, np.ndarray]) -> bool:
    """Move a constant zero spatial `Pad` into the Conv it feeds; False (nothing changed) otherwise."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in pad.attribute}
    mode = attrs.get("mode", b"constant")
    pads = consts.get(pad.input[1]) if len(pad.input) > 1 else None
    value = consts.get(pad.input[2], np.zeros(1)) if len(pad.input) > 2 and pad.input[2] else np.zeros(1)
    if mode not in (b"constant", "constant") or pads is None or (len(pad.input) > 3 and pad.input[3]) \
            or pads.shape != (8,) or pads[[0, 1, 4, 5]].any() or np.asarray(value).any():
        return False
    conv_attrs = {a.name: onnx.helper.get_attribute_value(a) for a in conv.attribute}
    if conv_attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return False
    old = list(conv_attrs.get("pads", [0, 0, 0, 0]))
    new = [old[0] + int(pads[2]), old[1] + int(pads[3]), old[2] + int(pads[6]), old[3] + int(pads[7])]
    for a in conv.attribute:
        if a.name == "pads":
            conv.attribute.remove(a)
            break
    conv.attribute.append(onnx.helper.make_attribute("pads", new))
    conv.input[0] = pad.input[0]
    return True


def _is_flatten(source: Any, target: Any) -> bool:
    """A Reshape from (B, d1, d2, ...) to (B, d1*d2*...) with the same batch dimension: a Flatten(axis=1)."""
    if source is None or target is None or len(target.dim) != 2 or len(source.dim) < 2:
        return False
    batch_in, batch_out = source.dim[0], target.dim[0]
    same_batch = (batch_in.dim_param and batch_in.dim_param == batch_out.dim_param) or \
        (batch_in.dim_value and batch_in.dim_value == batch_out.dim_value)
    rest = [d.dim_value for d in source.dim[1:]]
    return bool(same_batch) and all(rest) and target.dim[1].dim_value == int(np.prod(rest))


def _live(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """The nodes the graph outputs depend on, in their order."""
    needed, live = set(outputs), []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            live.append(node)
            needed.update(i for i in node.input if i)
    return live[::-1]
