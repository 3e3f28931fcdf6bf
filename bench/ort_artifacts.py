"""Build ONNX Runtime training artifacts for system 4 (run inside the onnxruntime-training venv).

``generate_artifacts`` on the Lite0 + head ONNX, with only the head's parameters trainable and the
cross-entropy loss, writes ``training_model.onnx``, ``eval_model.onnx``, ``optimizer_model.onnx``
and ``checkpoint``. The logits are an extra output so that accuracy needs no second model.

Patch: onnxruntime-training 1.19.2 reads ONNX IR version <= 10, but the ``onnx`` package installed
next to it writes the generated models with its own, newer IR version; nothing in them needs more
than IR 10, so every generated model gets ``ir_version = 10`` (run.py reports it).

ORT training's SGD has no momentum or dampening: the seed's SGD(lr, momentum 0.9) becomes plain SGD
with the same learning rate, so this system's accuracy after N steps is not comparable one to one.
"""

from __future__ import annotations

import argparse
import os

import onnx
from onnxruntime.training import artifacts

IR_VERSION = 10


def main() -> None:
    """Generate and patch the artifacts; print what was lowered."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="Lite0 + head ONNX (input data, output logits)")
    p.add_argument("out", help="artifact directory")
    p.add_argument("--trainable-prefix", default="head.", help="initializers to train")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    model = onnx.load(args.model)
    names = [init.name for init in model.graph.initializer]
    trainable = [n for n in names if n.startswith(args.trainable_prefix)]
    if not trainable:
        raise SystemExit(f"no initializer starts with {args.trainable_prefix!r} in {args.model}")
    artifacts.generate_artifacts(
        model, requires_grad=trainable, frozen_params=[n for n in names if n not in trainable],
        loss=artifacts.LossType.CrossEntropyLoss, optimizer=artifacts.OptimType.SGD,
        artifact_directory=args.out, additional_output_names=[model.graph.output[0].name])
    for name in ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx"):
        path = os.path.join(args.out, name)
        generated = onnx.load(path)
        if generated.ir_version > IR_VERSION:
            print(f"patched {name}: ir_version {generated.ir_version} -> {IR_VERSION}")
            generated.ir_version = IR_VERSION
            onnx.save(generated, path)
    print(f"trainable: {', '.join(trainable)}")


if __name__ == "__main__":
    main()
