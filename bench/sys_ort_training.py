"""System 4: ONNX Runtime training 1.19.2 on Lite0 + head, only the head trainable.

Uses the artifacts of ``ort_artifacts.py`` (``--extra`` is their directory) through
``onnxruntime.training.api`` Module / Optimizer / CheckpointState. Like the seed, every step runs the
whole graph (the frozen backbone included); evaluations run the eval model on every sample.
Checkpoints are ``CheckpointState.save_checkpoint`` with the optimizer state.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import onnxruntime as ort
from onnxruntime.training.api import CheckpointState, Module, Optimizer

import common


def main() -> None:
    """Run the work unit the arguments describe and print the seed-style log."""
    args = common.parser(__doc__.splitlines()[0]).parse_args()
    meta, _, _ = common.load_model_meta(args.model)
    train, test, val = common.load_splits(args.data, meta)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.inter_op_num_threads = 1
    state = CheckpointState.load_checkpoint(os.path.join(args.extra, "checkpoint"))
    module = Module(os.path.join(args.extra, "training_model.onnx"), state,
                    os.path.join(args.extra, "eval_model.onnx"), session_options=opts)
    optimizer = Optimizer(os.path.join(args.extra, "optimizer_model.onnx"), module)
    optimizer.set_learning_rate(meta["optimizer"]["lr"])
    batch = meta["batch_size"]

    def predict(split: common.Split) -> Callable[[np.ndarray], np.ndarray]:
        def run(idx: np.ndarray) -> np.ndarray:
            _, logits = module(split.images(idx), split.labels[idx])
            return logits.argmax(1)
        return run

    def save(name: str) -> None:
        CheckpointState.save_checkpoint(state, os.path.join(args.out, name),
                                        include_optimizer_state=True)

    log = common.SeedLog()
    for i, idx in enumerate(common.batch_order(len(train), batch, args.steps, args.seed), 1):
        module.train()
        loss, _ = module(train.images(idx), train.labels[idx])
        optimizer.step()
        module.lazy_reset_grad()
        log.step(i, float(loss))
        if i % args.test_every == 0:
            module.eval()
            log.test(common.accuracy(test, predict(test), batch))
        if i % args.save_every == 0:
            save(f"model_trained_{i}.ckpt")
    module.eval()
    log.validation(common.accuracy(val, predict(val), batch))
    save("model_trained.ckpt")


if __name__ == "__main__":
    main()
