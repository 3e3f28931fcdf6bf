"""`edgetune <command>`: one parser, each command's options and body in its own module.

Command modules are imported only when their command runs, so `edgetune --help` and the device-side
commands never import torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from edgetune import __version__
from edgetune.cli.errors import run_guarded

DESCRIPTION = ("Train on the device: a frozen pretrained backbone, a small trainable part. Export and convert "
               "on the host; train and evaluate the .tod model on the device (numpy + onnxruntime); "
               "package it for a device, or train one model across many devices with Flower.")
EPILOG = "A typical flow: export -> convert -> prepare-data -> run. `edgetune COMMAND -h` for a command's options."

# command name -> (module under edgetune.cli, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "export": ("export", "host: export a TransferNet as an ONNX training graph (needs torch)"),
    "convert": ("convert", "host: convert a training graph (or any ONNX backbone) to a .tod device model"),
    "prepare-data": ("prepare_data", "prepare a class-per-folder BMP dataset (Places365, image folders, Fashion-MNIST)"),
    "run": ("net_runner", "device: train and evaluate a .tod model, as the seed's net_runner"),
    "prepare-and-run": ("prepare_and_run", "build package-<target>/ and run it locally, over adb or ssh"),
    "federated": ("federated", "federated training on Flower: a superlink and N supernodes on this machine"),
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="edgetune", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"edgetune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:  # only the chosen command's module is imported
            importlib.import_module(f"edgetune.cli.{module}").add_arguments(p)
            p.set_defaults(_module=module)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    module = importlib.import_module(f"edgetune.cli.{args._module}")
    return run_guarded(lambda: module.run(args), prog=f"edgetune {args.command}")


if __name__ == "__main__":
    sys.exit(main())
