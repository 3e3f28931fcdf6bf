"""System: PyTorch eager doing edgetune's fine-tuning, with its own feature cache at the same cut.

The peer of `net_runner` on a `--trainable` model (issue 11): Lite0's stem and the blocks in front of
the cut run once per image in PyTorch eager under `torch.inference_mode` (BatchNorm unfused, batches
of 32), their output is cached in memory; then the tail (the trainable blocks, `_conv_head`, BN,
pooling, `_fc` and the head) trains in eager mode on the cached tensors, its BatchNorm as the `.tod`'s
nodes say (with the batch's statistics while it trains and the nodes' momentum, or frozen), with the
optimizer and parameter groups the `.tod` carries, in the Trainer's batch order, printing net_runner's
lines. The head starts from the `.tod`'s own initial weights; the pretrained blocks from the same Lite0
weights the `.tod` was exported from. `--extra` names the choice (`last-block`, `last-stage`).
"""

from __future__ import annotations


import numpy as np
import torch
from torch import nn

import common
import torch_cached
import torch_model
from finetune_torch import FIRST_BLOCK, Prefix, Tail

from edgetune.runtime.callbacks import make_schedule

EXTRACT_BATCH = 32


def optimizer(meta: dict, tail: Tail) -> torch.optim.Optimizer:
    """The `.tod`'s optimizer over the tail: each parameter group at `lr * lr_scale`, as the device runs it."""
    spec = dict(meta["optimizer"])
    name, lr = spec.pop("name"), spec.pop("lr")
    by_name = {f"head.{n}": p for n, p in tail.head.named_parameters()}
    if tail.net is not None:
        by_name.update({f"backbone.{n}": p for n, p in tail.net.named_parameters()})
    model_groups = meta.get("param_groups") or [{"params": meta["trainable"], "lr_scale": 1.0}]
    missing = [n for g in model_groups for n in g["params"] if n not in by_name]
    if missing:
        raise SystemExit(f"the tail has no parameters {missing[:3]} of the model's groups")
    groups = [{"params": [by_name[n] for n in g["params"]], "lr": lr * g["lr_scale"]} for g in model_groups]
    trained = {id(p) for g in groups for p in g["params"]}
    for p in tail.parameters():
        p.requires_grad_(id(p) in trained)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=tuple(spec["betas"]), eps=spec["eps"],
                                weight_decay=spec["weight_decay"])
    return torch.optim.SGD(groups, lr=lr, momentum=spec.get("momentum", 0.0), dampening=spec.get("dampening", 0.0),
                           weight_decay=spec.get("weight_decay", 0.0), nesterov=spec.get("nesterov", False))


def tail_for(choice: str, params: dict[str, np.ndarray], net: nn.Module) -> Tail:
    """The trainable tail of `choice` over pretrained `net`, its head starting from the `.tod`'s weights, in eval mode."""
    head = nn.Linear(*params["head.weight"].shape[::-1])
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(params["head.weight"]))
        head.bias.copy_(torch.from_numpy(params["head.bias"]))
    return Tail(net, FIRST_BLOCK.get(choice), head).eval()  # eval: BatchNorm normalises with its running statistics


def batch_statistics(meta: dict) -> float | None:
    """PyTorch's BatchNorm momentum if the `.tod`'s trainable BatchNorm nodes train with batch statistics, else None."""
    nodes = [n["attributes"] for n in meta["head"] if n["op"] == "BatchNormalization"]
    training = {int(a.get("training_mode", 0)) for a in nodes}
    if len(training) > 1:
        raise SystemExit("the model mixes BatchNorm nodes with frozen and batch statistics; this peer runs one kind")
    return 1 - nodes[0]["momentum"] if training == {1} else None  # ONNX's convention is the opposite


def main() -> None:
    """Run the work unit the arguments describe and print the seed-style log."""
    args = common.parser(__doc__.splitlines()[0]).parse_args()
    if args.extra not in FIRST_BLOCK:
        raise SystemExit(f"--extra must name a choice, one of {sorted(FIRST_BLOCK)}; got {args.extra!r}")
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    meta, params, _ = common.load_model_meta(args.model)
    splits = common.load_splits(args.data, meta)
    net = torch_model.backbone()
    first = FIRST_BLOCK[args.extra]
    prefix = Prefix(net, first).eval()
    tail = tail_for(args.extra, params, net)

    def run(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return prefix(torch.from_numpy(images)).numpy()

    cached = {s.name: torch_cached.extract(s, run, EXTRACT_BATCH) for s in splits}
    opt = optimizer(meta, tail)

    def state() -> dict:
        return {"tail": {n: p for n, p in tail.named_parameters() if p.requires_grad}, "optimizer": opt.state_dict()}

    schedule = make_schedule(meta.get("schedule", "constant"), args.steps)  # as net_runner follows the model's
    mixup = (meta["mixup"], meta["num_classes"]) if meta.get("mixup") else None  # as the Trainer follows the model's
    momentum = batch_statistics(meta)
    tail.use_batch_statistics(momentum, False)  # the momentum; train mode (its path has no dropout) switches them on
    torch_cached.train(args, tail, opt, cached, splits, meta["batch_size"], state, train_mode=momentum is not None,
                       schedule=schedule.rate if schedule is not None else None, mixup=mixup)

if __name__ == "__main__":
    main()
