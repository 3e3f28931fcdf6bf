"""`edgetune convert`: an ONNX training graph, or any ONNX backbone cut at a tensor, to a `.tod` device model.

The seed's `converter_lite --fmk=MINDIR --trainModel=true --modelFile=X --outputFile=Y`. With
`--quantize int8 --calibration DIR` the frozen part is statically quantized (onnxruntime's tools,
QDQ, per-channel weights, calibrated on DIR's train split); `--tod MODEL` quantizes an existing `.tod`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from edgetune.cli.export import add_training_arguments, class_names_from, optimizer_from
from edgetune.convert.spec import METHODS, PREPROCESSING_PRESETS, SCHEMES, Int8
from edgetune.errors import UserError

REDUCE_RANGE = {"auto": None, "on": True, "off": False}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="the training graph from `edgetune export`")
    source.add_argument("--backbone-onnx", type=Path, metavar="MODEL",
                        help="any ONNX backbone; with --cut and --num-classes, a default head is added")
    source.add_argument("--tod", type=Path, metavar="MODEL",
                        help="a .tod with an fp32 frozen part: with --quantize, write its quantized version "
                             "(head, optimizer state and training record kept)")
    parser.add_argument("--output", type=Path,
                        help="output model (.tod appended unless present; default: the input without .onnx, "
                             "or <input>_int8 for --tod)")
    group = parser.add_argument_group("with --backbone-onnx")
    group.add_argument("--cut", metavar="TENSOR", help="the (N, F) tensor where the frozen part ends")
    group.add_argument("--preprocessing", choices=PREPROCESSING_PRESETS, default="lite0",
                       help="how the backbone expects its pixels (default lite0: (p - 127) / 128)")
    add_training_arguments(group)
    quant = parser.add_argument_group("quantization of the frozen part (onnxruntime static quantization, QDQ)")
    quant.add_argument("--quantize", choices=SCHEMES,
                       help="int8: per-channel int8 weights, uint8 activations; the trainable part stays fp32")
    quant.add_argument("--calibration", type=Path, metavar="DIR",
                       help="a dataset prepared by `edgetune prepare-data`: calibration images come from its "
                            "train split, through the model's own preprocessing")
    quant.add_argument("--calibration-images", type=int, default=Int8.images, metavar="N",
                       help=f"calibration images, the same number from every class (default {Int8.images})")
    quant.add_argument("--calibration-method", choices=METHODS, default=Int8.method,
                       help=f"how activation ranges are chosen (default {Int8.method})")
    quant.add_argument("--calibration-percentile", type=float, default=Int8.percentile, metavar="P",
                       help=f"for percentile: the share of each activation's values kept, in %% "
                            f"(default {Int8.percentile})")
    quant.add_argument("--reduce-range", choices=REDUCE_RANGE, default="auto",
                       help="7-bit weights, for x86 CPUs without VNNI (default auto: from this machine's CPU)")
    quant.add_argument("--keep-fp32", nargs="+", default=[], metavar="NODE",
                       help="frozen-graph nodes to leave in fp32")


def run(args: argparse.Namespace) -> int:
    quantize = quantize_spec(args)
    from edgetune.convert import convert, convert_backbone, quantize_tod

    if args.tod is not None:
        if quantize is None:
            raise UserError("--tod converts an existing model's frozen part: it needs --quantize and --calibration")
        output = args.output if args.output is not None else Path(os.fspath(args.tod)).with_suffix("")
        path = quantize_tod(args.tod, output if args.output is not None else f"{output}_int8", quantize)
        print(f"wrote {path}")
        return 0
    source = args.model if args.model is not None else args.backbone_onnx
    output = args.output if args.output is not None else Path(os.fspath(source)).with_suffix("")
    if args.model is not None:
        path = convert(args.model, output, quantize=quantize)
    else:
        if args.cut is None:
            raise UserError("--backbone-onnx needs --cut TENSOR (the features tensor)")
        num_classes, names = class_names_from(args)
        path = convert_backbone(args.backbone_onnx, args.cut, num_classes, output, class_names=names,
                                preprocessing=args.preprocessing, optimizer=optimizer_from(args),
                                batch_size=args.batch_size, seed=args.seed, quantize=quantize)
    print(f"wrote {path}")
    return 0


def quantize_spec(args: argparse.Namespace) -> Int8 | None:
    """The `Int8` spec the options ask for, None without --quantize; checked before any conversion starts."""
    if args.quantize is None:
        if args.calibration is not None:
            raise UserError("--calibration applies to --quantize int8 only")
        return None
    if args.calibration is None:
        raise UserError("--quantize int8 needs --calibration DIR (a dataset prepared by `edgetune prepare-data`)")
    spec = Int8(calibration=args.calibration, images=args.calibration_images, method=args.calibration_method,
                percentile=args.calibration_percentile, reduce_range=REDUCE_RANGE[args.reduce_range],
                exclude=tuple(args.keep_fp32))
    spec.check()
    return spec
