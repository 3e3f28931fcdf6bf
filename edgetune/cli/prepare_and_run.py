"""`edgetune prepare-and-run`: the seed's prepare_and_run.sh.

Exports and converts the model (or takes a `.tod`), prepares the dataset, builds
`package-<target>/` with an offline runtime bundle, then runs eval_untrained.sh, train.sh and
eval.sh: locally (x86), on an adb device, or on an ssh host. Nothing is written outside the
package folder (and the remote folder).
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import sys
from pathlib import Path

from edgetune.errors import UserError

FASHION = "fashion-mnist"
# seed headers printed before each script, as its prepare_and_run.sh does
STAGES = (("eval_untrained.sh", "==Evaluating Untrained Model==="),
          ("train.sh", "========Training on Device====="),
          ("eval.sh", "===Evaluating trained Model====="))
MODEL_NAME = "transfer_learning_tod"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The seed's options (-D data, -t target) plus deployment and export options."""
    from edgetune.convert.spec import OPTIMIZERS
    from edgetune.deploy.bundle import TARGETS
    from edgetune.deploy.package import DEMO_TRAIN_ARGS

    parser.add_argument("-D", "--data-source", default=FASHION, metavar="SRC",
                        help=f"a Places365 folder (val_256/ + places365_val.txt), an image folder with one "
                             f"subfolder per class, a prepared dataset (classes.txt), or {FASHION!r} (default)")
    parser.add_argument("-t", "--target", choices=list(TARGETS), default="x86", help="device platform (default x86)")
    parser.add_argument("--via", choices=["local", "adb", "ssh"],
                        help="where the scripts run (default: local for x86, adb for arm64)")
    parser.add_argument("--host", help="ssh destination for --via ssh (user@host or a Host of the ssh config)")
    parser.add_argument("--remote-dir", help="folder the package goes into on the device "
                                             "(default /data/local/tmp for adb, the login folder for ssh)")
    parser.add_argument("--ssh-config", type=Path, help="ssh config file (ssh -F)")
    parser.add_argument("--port", type=int, help="ssh port")
    parser.add_argument("--serial", help="adb device serial (adb -s)")
    parser.add_argument("-o", "--output", type=Path, help="package folder (default ./package-<target>)")
    parser.add_argument("--model", type=Path, help="use this .tod instead of exporting and converting one")
    parser.add_argument("--per-class", type=int, metavar="N",
                        help="images per class (default 100 for Places365 and Fashion-MNIST, all for an image folder)")
    parser.add_argument("--wheels-from", type=Path, help="reuse the dependency wheels of an earlier package's wheels/")
    parser.add_argument("--python-version", default="3.11", help="the device's Python (default 3.11)")
    parser.add_argument("--no-run", action="store_true", help="build the package, run nothing")
    export = parser.add_argument_group("export (edgetune export)")
    export.add_argument("--backbone", default="efficientnet-lite0")
    export.add_argument("--batch-size", type=int, default=32)
    export.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="sgd")
    export.add_argument("--lr", type=float, help="learning rate stored in the model (default sgd 0.0015, adam 0.001)")
    export.add_argument("--momentum", type=float, help="sgd (default 0.9)")
    export.add_argument("--dampening", type=float, help="sgd (default 0.01)")
    export.add_argument("--seed", type=int, default=0, help="seed of the head's initial weights (default 0)")
    parser.add_argument("--train-args", default=" ".join(DEMO_TRAIN_ARGS),
                        help=f"net_runner options for train.sh (default {' '.join(DEMO_TRAIN_ARGS)!r})")


def run(args: argparse.Namespace) -> int:
    """Build the package and run its three scripts; prints the package folder."""
    import shlex

    from edgetune.deploy import package as pkg

    try:
        train_args = tuple(shlex.split(args.train_args))
    except ValueError as e:
        raise UserError(f"--train-args: {e}") from None
    transport = _transport(args)  # fail on a missing tool or device before the long build
    out = pkg.clean_package_dir(args.output or Path(f"package-{args.target}"))
    stage = out / ".work"
    stage.mkdir()
    dataset = _dataset(args.data_source, stage / "dataset", args.per_class)
    model = args.model if args.model is not None else _export_and_convert(args, dataset, stage)
    package = pkg.build_package(args.target, out, model, dataset, wheels_from=args.wheels_from,
                                python_version=args.python_version, train_args=train_args)
    shutil.rmtree(stage)
    print(f"package: {package.root.resolve()}", flush=True)
    if transport is None:
        return 0
    if args.via != "local":
        print("=======Pushing to device=======", flush=True)
    print(f"package on the device: {transport.push(package.root)}", flush=True)
    for script, header in STAGES:
        print(header, flush=True)
        status = transport.run(script)
        if status != 0:
            raise UserError(f"{script} failed with exit status {status}")
    return 0


def _transport(args: argparse.Namespace):
    """The transport for --via (checked now: tool on PATH, device or host reachable), None for --no-run."""
    from edgetune.deploy import transport

    args.via = args.via or ("local" if args.target == "x86" else "adb")
    if args.via == "ssh" and not args.host:
        raise UserError("--via ssh needs --host")
    if args.via != "ssh" and (args.host or args.ssh_config or args.port):
        raise UserError("--host, --ssh-config and --port go with --via ssh")
    if args.via == "local" and args.target != "x86":
        raise UserError(f"a {args.target} package cannot run here: use --via adb or --via ssh")
    if args.no_run:
        return None
    if args.via == "local":
        return transport.Local()
    if args.via == "adb":
        return transport.Adb(args.remote_dir or "/data/local/tmp", serial=args.serial)
    return transport.Ssh(args.host, args.remote_dir or ".", config=args.ssh_config, port=args.port)


def _dataset(source: str, staged: Path, per_class: int | None) -> Path:
    """A prepared dataset folder for `source`: used as is when already prepared, else prepared into `staged`."""
    from edgetune.data import prepare

    print(f"== preparing the dataset from {source}", file=sys.stderr, flush=True)
    if source == FASHION:
        prepare.prepare_fashion_mnist(staged, per_class=per_class or 100)
        return staged
    src = Path(source)
    if not src.is_dir():
        raise UserError(f"{source}: no such folder (and not {FASHION!r})")
    if (src / "classes.txt").is_file():
        return src
    if (src / "val_256").is_dir():
        prepare.prepare_places365(src, staged, per_class=per_class or 100)
    else:
        prepare.prepare_image_folder(src, staged, per_class=per_class)
    return staged


def _export_and_convert(args: argparse.Namespace, dataset: Path, stage: Path) -> Path:
    """Run `edgetune export` and `edgetune convert` (class names from the dataset) into `stage`."""
    from edgetune.cli.main import parse_args
    from edgetune.runtime.dataset import read_class_file

    classes = dataset / "classes.txt"
    onnx_path = stage / f"{MODEL_NAME}.onnx"
    export = ["export", "--backbone", args.backbone, "--num-classes", str(len(read_class_file(classes))),
              "--class-names-from", str(classes), "--batch-size", str(args.batch_size),
              "--optimizer", args.optimizer, "--seed", str(args.seed), "-o", str(onnx_path)]
    for name in ("lr", "momentum", "dampening"):
        if getattr(args, name) is not None:
            export += [f"--{name}", str(getattr(args, name))]
    convert = ["convert", "--model", str(onnx_path), "--output", str(stage / MODEL_NAME)]
    for argv in (export, convert):
        print(f"== edgetune {argv[0]}", file=sys.stderr, flush=True)
        parsed = parse_args(argv)
        importlib.import_module(f"edgetune.cli.{parsed._module}").run(parsed)
    return stage / f"{MODEL_NAME}.tod"
