"""`edgetune export`: build a TransferNet from the backbone registry and export its ONNX training graph.

The seed's `transfer_learning_export.py`. Options shared with `edgetune convert --backbone-onnx`
(optimizer, classes, batch size, seed) are defined here once. `--trainable` chooses how deep the
device fine-tunes; each choice brings its measured default optimizer and learning rates, which
the optimizer options override one by one.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

from edgetune.convert.spec import OPTIMIZERS, SGD, Adam, Algorithm
from edgetune.errors import UserError
from edgetune.runtime.meta import SCHEDULES

# optimizer settings with a command-line option; each applies to the optimizers that have that setting
SETTING_OPTIONS = ("lr", "momentum", "dampening", "nesterov", "weight_decay", "betas", "eps")


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """Classes, batch size, seed and optimizer options (export and convert --backbone-onnx)."""
    parser.add_argument("--num-classes", type=int, help="number of classes (default: from --class-names-from)")
    parser.add_argument("--class-names-from", type=Path, metavar="CLASSES_TXT",
                        help="the dataset's classes.txt (or its directory): lines `<folder>\\t<name>`")
    parser.add_argument("--batch-size", type=int, default=32, help="training batch size (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the head's initial weights (default 0)")
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS),
                        help="default: the --trainable choice's recipe (export), sgd (convert)")
    parser.add_argument("--lr", type=float, help=f"learning rate (default: the recipe's; sgd {SGD.lr}, adam {Adam.lr})")
    parser.add_argument("--momentum", type=float, help=f"sgd (default {SGD.momentum})")
    parser.add_argument("--dampening", type=float, help=f"sgd (default {SGD.dampening})")
    parser.add_argument("--nesterov", action="store_true", default=None, help="sgd")
    parser.add_argument("--weight-decay", type=float, help="L2 penalty (sgd and adam; default 0)")
    parser.add_argument("--betas", type=float, nargs=2, metavar=("B1", "B2"),
                        help=f"adam (default {' '.join(map(str, Adam.betas))})")
    parser.add_argument("--eps", type=float, help=f"adam (default {Adam.eps})")


def optimizer_from(args: argparse.Namespace, base: Algorithm = SGD()) -> Algorithm:
    """The optimizer entry the options describe: `base` (a recipe's) with the options given on top.

    `--optimizer` picks the entry (default: `base`'s); another entry than `base`'s starts from its
    own defaults. Every option given replaces that one setting.

    Raises:
        UserError: an option the chosen optimizer does not have, or a bad value.
    """
    algorithm = OPTIMIZERS[args.optimizer] if args.optimizer is not None else type(base)
    start = base if type(base) is algorithm else algorithm()
    settings = set(algorithm.settings())
    given = {name: getattr(args, name) for name in SETTING_OPTIONS if getattr(args, name, None) is not None}
    foreign = sorted(set(given) - settings)
    if foreign:
        raise UserError(f"--{foreign[0].replace('_', '-')} is not a setting of {algorithm.name} "
                        f"(it has {', '.join(sorted(settings))})")
    return dataclasses.replace(start, **given)


def class_names_from(args: argparse.Namespace) -> tuple[int, list[str] | None]:
    """`(num_classes, class names or None)` from --num-classes and --class-names-from, checked against each other."""
    names = None
    if args.class_names_from is not None:
        from edgetune.runtime.dataset import read_class_file

        path = args.class_names_from
        path = path / "classes.txt" if path.is_dir() else path
        names = [name for _folder, name in read_class_file(path)]
    if names is not None and args.num_classes is not None and len(names) != args.num_classes:
        raise UserError(f"--num-classes {args.num_classes} but {args.class_names_from} lists {len(names)} classes")
    num = len(names) if names is not None else args.num_classes
    if num is None or num < 1:
        raise UserError("give --num-classes N (>= 1) or --class-names-from DIR/classes.txt")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    return num, names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", default="efficientnet-lite0",
                        help="a registered backbone: efficientnet-lite0 (default), efficientnet-lite0-features, "
                             "efficientnet-b0")
    parser.add_argument("--weights", type=Path, metavar="FILE", help="backbone weights (a PyTorch state dict file)")
    parser.add_argument("--head-hidden", type=int, metavar="N", help="add a hidden Dense(N) + ReLU layer to the head")
    parser.add_argument("--dropout", type=float, default=0.0, help="dropout before the last layer (with --head-hidden)")
    parser.add_argument("--trainable", default="head", metavar="CHOICE",
                        help="what the device trains: head (default, the seed's), last-block, last-stage, or "
                             "comma-separated module names such as backbone._blocks.15,backbone._conv_head "
                             "(the head always trains); each choice brings its default optimizer and rates")
    parser.add_argument("--backbone-lr-scale", type=float, metavar="X",
                        help="learning-rate factor of the backbone parameters that train (default: the recipe's)")
    parser.add_argument("--schedule", choices=SCHEDULES,
                        help="learning-rate schedule net_runner follows over a run unless told otherwise "
                             "(default: the recipe's: cosine for last-block and backbone module names, constant otherwise)")
    parser.add_argument("--mixup", type=float, metavar="ALPHA",
                        help="strength of mixup at the cut the device trains with unless told otherwise, 0 = off "
                             "(default: the recipe's: 0.2 for last-block and backbone module names, 0 otherwise)")
    parser.add_argument("--batch-statistics", action=argparse.BooleanOptionalAction,
                        help="the trainable part's BatchNorm normalises each training batch with its own statistics "
                             "and adapts the running ones, more accurate on images far from ImageNet "
                             "(default: the recipe's: on for last-block and backbone module names, off otherwise)")
    add_training_arguments(parser)
    parser.add_argument("-o", "--output", type=Path, default=Path("transfer_learning_tod.onnx"),
                        help="the ONNX training graph to write (default transfer_learning_tod.onnx)")


def run(args: argparse.Namespace) -> int:
    num_classes, names = class_names_from(args)
    if args.head_hidden is not None and args.head_hidden < 1:
        raise UserError(f"--head-hidden must be >= 1, got {args.head_hidden}")
    if args.dropout and (args.head_hidden is None or not 0 <= args.dropout < 1):
        raise UserError("--dropout needs --head-hidden and a value in [0, 1)")
    if args.backbone_lr_scale is not None and not args.backbone_lr_scale > 0:
        raise UserError(f"--backbone-lr-scale must be > 0, got {args.backbone_lr_scale}")
    from edgetune.host import TransferNet, create_backbone, default_head, export
    from edgetune.host.trainable import select

    backbone, info = create_backbone(args.backbone, args.weights)
    head = default_head(info.features, num_classes, seed=args.seed, hidden=args.head_hidden, dropout=args.dropout)
    net = TransferNet(backbone, head)
    selection = select(net, args.trainable)
    optimizer = optimizer_from(args, selection.recipe.optimizer)
    path = export(net, args.trainable, optimizer=optimizer, batch_size=args.batch_size, class_names=names,
                  path=args.output, backbone_lr_scale=args.backbone_lr_scale, schedule=args.schedule,
                  mixup=args.mixup, batch_statistics=args.batch_statistics)
    alpha = selection.recipe.mixup if args.mixup is None else args.mixup
    statistics = selection.recipe.batch_statistics if args.batch_statistics is None else args.batch_statistics
    extras = f", mixup {alpha:g}" if alpha else ""
    extras += ", BN batch statistics" if statistics and selection.backbone else ""
    params = dict(net.named_parameters())
    weights = sum(params[n].numel() for n in selection.params)
    print(f"wrote {os.fspath(path)} ({info.name}, {num_classes} classes, trainable {selection.choice}: "
          f"{weights} weights, {optimizer.name} lr {optimizer.lr:g}, "
          f"{args.schedule or selection.recipe.schedule} schedule{extras}, batch {args.batch_size})")
    return 0
