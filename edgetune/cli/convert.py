"""`edgetune convert`: an ONNX training graph, or any ONNX backbone cut at a tensor, to a `.tod` device model.

The seed's `converter_lite --fmk=MINDIR --trainModel=true --modelFile=X --outputFile=Y`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from edgetune.cli.export import add_training_arguments, class_names_from, optimizer_from
from edgetune.convert.spec import PREPROCESSING_PRESETS
from edgetune.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="the training graph from `edgetune export`")
    source.add_argument("--backbone-onnx", type=Path, metavar="MODEL",
                        help="any ONNX backbone; with --cut and --num-classes, a default head is added")
    parser.add_argument("--output", type=Path,
                        help="output model (.tod appended unless present; default: the input without .onnx)")
    group = parser.add_argument_group("with --backbone-onnx")
    group.add_argument("--cut", metavar="TENSOR", help="the (N, F) tensor where the frozen part ends")
    group.add_argument("--preprocessing", choices=PREPROCESSING_PRESETS, default="lite0",
                       help="how the backbone expects its pixels (default lite0: (p - 127) / 128)")
    add_training_arguments(group)


def run(args: argparse.Namespace) -> int:
    source = args.model if args.model is not None else args.backbone_onnx
    output = args.output if args.output is not None else Path(os.fspath(source)).with_suffix("")
    from edgetune.convert import convert, convert_backbone

    if args.model is not None:
        path = convert(args.model, output)
    else:
        if args.cut is None:
            raise UserError("--backbone-onnx needs --cut TENSOR (the features tensor)")
        num_classes, names = class_names_from(args)
        path = convert_backbone(args.backbone_onnx, args.cut, num_classes, output, class_names=names,
                                preprocessing=args.preprocessing, optimizer=optimizer_from(args),
                                batch_size=args.batch_size, seed=args.seed)
    print(f"wrote {path}")
    return 0
