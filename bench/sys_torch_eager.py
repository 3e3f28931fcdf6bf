"""System 2: PyTorch eager doing what the seed does.

Every step decodes its batch and runs the frozen backbone under ``torch.no_grad`` before training
the head; test and validation accuracy also go through the backbone. Checkpoints hold the whole
model (backbone + head) and the optimizer state, as the seed's ``.ms`` checkpoints do.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

import common
import torch_model


def main() -> None:
    """Run the work unit the arguments describe and print the seed-style log."""
    args = common.parser(__doc__.splitlines()[0]).parse_args()
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    meta, params, _ = common.load_model_meta(args.model)
    train, test, val = common.load_splits(args.data, meta)
    backbone = torch_model.backbone()
    head = torch_model.head(meta, params)
    opt = torch_model.optimizer(meta, head.parameters())
    batch = meta["batch_size"]

    def predict(split: common.Split) -> Callable[[np.ndarray], np.ndarray]:
        def run(idx: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return head(backbone(torch.from_numpy(split.images(idx)))).argmax(1).numpy()
        return run

    def save(name: str) -> None:
        torch.save({"backbone": backbone.state_dict(), "head": head.state_dict(),
                    "optimizer": opt.state_dict()}, os.path.join(args.out, name))

    log = common.SeedLog()
    for i, idx in enumerate(common.batch_order(len(train), batch, args.steps, args.seed), 1):
        with torch.no_grad():
            features = backbone(torch.from_numpy(train.images(idx)))
        head.train()
        loss = nn.functional.cross_entropy(head(features), torch.from_numpy(train.labels[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        log.step(i, loss.item())
        if i % args.test_every == 0:
            head.eval()
            log.test(common.accuracy(test, predict(test), batch))
        if i % args.save_every == 0:
            save(f"model_trained_{i}.pt")
    head.eval()
    log.validation(common.accuracy(val, predict(val), batch))
    save("model_trained.pt")


if __name__ == "__main__":
    main()
