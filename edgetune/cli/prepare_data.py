"""`edgetune prepare-data`: build the class-per-folder dataset the device trains on.

    edgetune prepare-data --fashion-mnist -o dataset            # the demo's default data
    edgetune prepare-data --places365 places365/ -o dataset     # the seed's ten Places365 classes
    edgetune prepare-data --images my_photos/ -o dataset        # any ImageFolder-style tree
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgetune.data.prepare import FASHION_SOURCE, FORMATS, SEED_CLASSES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--places365", type=Path, metavar="DIR",
                        help="Places365 directory with val_256/ and places365_val.txt")
    source.add_argument("--images", type=Path, metavar="DIR", help="a class-per-folder image tree")
    source.add_argument("--fashion-mnist", action="store_true",
                        help=f"Fashion-MNIST from {FASHION_SOURCE} (Debian dataset-fashion-mnist): the test "
                        "split, 1000 images per class; above that the train split too, up to 7000 per class")
    parser.add_argument("-o", "--output", type=Path, default=Path("dataset"), help="output directory (default: dataset)")
    parser.add_argument("--classes", type=int, nargs="+", metavar="ID",
                        help="Places365 class ids in label order (default: the seed's %s)"
                        % " ".join(map(str, SEED_CLASSES)))
    parser.add_argument("--per-class", type=int, metavar="N",
                        help="images per class (default: 100 for Places365 and Fashion-MNIST, all for --images)")
    parser.add_argument("--format", choices=FORMATS, default="bmp", help="image file format (default: bmp)")
    parser.add_argument("--resize-shorter", type=int, default=256, metavar="PX",
                        help="--images: shorter side before cropping, 0 to crop the original (default: 256)")
    parser.add_argument("--crop", type=int, default=224, metavar="PX",
                        help="--images: side of the square center crop (default: 224)")
    parser.add_argument("--fashion-source", type=Path, default=Path(FASHION_SOURCE), metavar="DIR",
                        help=f"where the Fashion-MNIST IDX files are (default: {FASHION_SOURCE})")


def run(args: argparse.Namespace) -> int:
    from edgetune.data import prepare
    from edgetune.errors import UserError

    if args.classes and not args.places365:
        raise UserError("--classes applies to --places365 only")
    per_class = 100 if args.per_class is None else args.per_class
    if args.places365:
        report = prepare.prepare_places365(args.places365, args.output, args.classes or prepare.SEED_CLASSES,
                                           args.format, per_class=per_class)
    elif args.images:
        if args.crop < 1 or args.resize_shorter < 0:
            raise UserError("--crop must be positive and --resize-shorter not negative")
        report = prepare.prepare_image_folder(args.images, args.output, args.resize_shorter or None, args.crop,
                                              args.format, per_class=args.per_class)
    else:
        report = prepare.prepare_fashion_mnist(args.output, per_class, args.fashion_source, args.format)
    if not report.up_to_date:
        print(f"{report.out}: {report.total} images in {len(report.class_names)} classes "
              f"({report.written} written, {report.existing} already there, {len(report.skipped)} skipped)",
              file=sys.stderr)
    return 0
