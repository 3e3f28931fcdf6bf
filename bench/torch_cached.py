"""What the three cached PyTorch systems share: features of every split once, then a torch head trains.

The systems differ only in where the features come from (PyTorch eager, tuned PyTorch, or the
``.tod``'s frozen graph in onnxruntime); the head, its optimizer, the batch order (the Trainer's,
``common.batch_order``), the evaluations and the checkpoints are this one loop, so the table's
differences between them are the feature extractor's alone.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

import common
import torch_model

from edgetune.runtime.mixup import mix

Extract = Callable[[np.ndarray], np.ndarray]  # (N, 3, H, W) float32 images -> (N, F) features


def extract(split: common.Split, run: Extract, batch: int, pad: bool = False) -> torch.Tensor:
    """Features of every image of a split, ``batch`` images at a time.

    Args:
        split: the split (decoded through edgetune's loader, batch by batch).
        run: the feature extractor.
        batch: images per call.
        pad: fill the last partial batch with zero images (dropped from the result), so a compiled
            graph sees one input shape only and never recompiles.
    """
    out = []
    for start in range(0, len(split), batch):
        idx = np.arange(start, min(start + batch, len(split)))
        images = split.images(idx)
        if pad and len(idx) < batch:
            images = np.concatenate([images, np.zeros((batch - len(idx), *images.shape[1:]), images.dtype)])
        out.append(np.asarray(run(images))[:len(idx)])
    return torch.from_numpy(np.concatenate(out))


def train_head(args: argparse.Namespace, meta: dict, params: dict[str, np.ndarray],
               cached: dict[str, torch.Tensor], splits: tuple[common.Split, ...]) -> None:
    """Train the ``.tod``'s head on cached features as the seed's loop does, printing its log.

    Checkpoints hold the head and the optimizer state (the backbone never changes, so it is not
    saved again).
    """
    head = torch_model.head(meta, params)
    opt = torch_model.optimizer(meta, head.parameters())
    train(args, head, opt, cached, splits, meta["batch_size"],
          lambda: {"head": head.state_dict(), "optimizer": opt.state_dict()})


def train(args: argparse.Namespace, model: nn.Module, opt: torch.optim.Optimizer, cached: dict[str, torch.Tensor],
          splits: tuple[common.Split, ...], batch_size: int, state: Callable[[], dict],
          train_mode: bool = True, schedule: Callable[[int, float], float] | None = None,
          mixup: tuple[float, int] | None = None) -> None:
    """The seed's loop over cached features: steps in the Trainer's order, its log lines, test accuracy
    every ``args.test_every`` steps, a checkpoint (``state()``) every ``args.save_every``, validation at the end.

    ``train_mode=False`` keeps ``model`` in eval mode while it trains (a pretrained tail whose
    BatchNorm statistics stay frozen); otherwise it trains in train mode and evaluates in eval mode.
    ``schedule(step, base)``: each group's rate for the step after ``step`` steps (the model's
    `meta.schedule` as net_runner follows it, `make_schedule(...).rate`); None keeps the rates.
    ``mixup``: (the model's `meta.mixup`, its class count): each batch is mixed by edgetune's own `mix`
    (the Trainer's draws for the same seed and step) and trains on the soft targets; None: no mixing.
    """
    labels = {s.name: torch.from_numpy(s.labels) for s in splits}
    train_split = next(s for s in splits if s.name == "train")

    def accuracy(name: str) -> float:
        model.eval()
        with torch.inference_mode():  # 100 samples at a time: a deep tail's activations stay small
            predicted = torch.cat([model(x).argmax(1) for x in cached[name].split(100)])
        return float((predicted == labels[name]).float().mean())

    def save(name: str) -> None:
        torch.save(state(), os.path.join(args.out, name))

    log = common.SeedLog()
    bases = [g["lr"] for g in opt.param_groups]
    for i, idx in enumerate(common.batch_order(len(train_split), batch_size, args.steps, args.seed), 1):
        if schedule is not None:
            for g, base in zip(opt.param_groups, bases):
                g["lr"] = schedule(i - 1, base)
        model.train(train_mode)
        t = torch.from_numpy(idx)
        x, y = cached["train"][t], labels["train"][t]
        if mixup is not None:
            alpha, classes = mixup
            x, y = map(torch.from_numpy, mix(x.numpy(), y.numpy(), classes, alpha, args.seed, i - 1))
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        log.step(i, loss.item())
        if i % args.test_every == 0:
            log.test(accuracy("test"))
        if i % args.save_every == 0:
            save(f"model_trained_{i}.pt")
    log.validation(accuracy("validation"))
    save("model_trained.pt")
