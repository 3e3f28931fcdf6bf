"""PyTorch reference for fine-tuning deeper than the head, with features cached at the cut (issue 11).

For each trainable choice of EfficientNet-Lite0 (`head`, `last-block`, `last-stage`, as
`edgetune export --trainable` names them) the frozen prefix runs once per image in torch and its
output is cached at the cut (in memory; on disk under `--cache-dir` between runs); the trainable
tail then trains in torch eager on the cached tensors, its BatchNorm as the recipe says: frozen
(`last-stage`'s: the tail stays in eval mode, BN normalises with its running statistics, its scale
and shift train), or with the batch's statistics while it trains (`last-block`'s, at the momentum
the export writes; `--batch-statistics` / `--no-batch-statistics` overrides the recipe). This is
the "PyTorch eager doing the same fine-tuning with its own cache at the same cut" system of the
benchmark, and the tool that chose each choice's default recipe (`edgetune.host.trainable.RECIPES`).

Next to it, the linear-probe bound: a converged logistic regression (scikit-learn, L-BFGS) on the
frozen 1000 logits, at C=1 and at the C best on the test split.

    python bench/finetune_torch.py --data /work/data/fm300                # default recipes, one table
    python bench/finetune_torch.py --data DIR --sweep --out sweep.json   # the recipe search

Hyper-parameters are chosen on the test split; validation is what the table reports.
Accuracy does not depend on machine load; the step times do.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgetune.convert.spec import SGD, Adam
from edgetune.host import create_backbone, default_head
from edgetune.host.export import BN_MOMENTUM
from edgetune.host.trainable import RECIPES, Recipe
from edgetune.runtime.callbacks import make_schedule
from edgetune.runtime.dataset import load_dataset
from edgetune.runtime.mixup import mix

BATCH = 32
EXTRACT_BATCH = 32
FIRST_BLOCK = {"last-block": 15, "last-stage": 11}  # the first trainable MBConv block of each choice
EARLIEST = min(FIRST_BLOCK.values())  # the disk cache holds the earliest cut; later cuts derive from it


class Prefix(nn.Module):
    """Lite0's stem and blocks [0, end): the frozen part in front of a cut inside the blocks."""

    def __init__(self, net: nn.Module, end: int, start: int = 0) -> None:
        super().__init__()
        self.net, self.start, self.end = net, start, end

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.start == 0:
            x = self.net._swish(self.net._bn0(self.net._conv_stem(x)))
        for block in list(self.net._blocks)[self.start:self.end]:
            x = block(x)  # eval mode: drop-connect is off
        return x


class Tail(nn.Module):
    """Blocks [first, 16) + conv_head + BN + ReLU6 + pooling + `_fc` + our head: the trainable part."""

    def __init__(self, net: nn.Module, first: int | None, head: nn.Module) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(list(net._blocks)[first:]) if first is not None else nn.ModuleList()
        self.net = net if first is not None else None
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.net is not None:
            for block in self.blocks:
                x = block(x)
            net = self.net
            x = net._swish(net._bn1(net._conv_head(x)))
            x = net._fc(net._avg_pooling(x).flatten(1))
        return self.head(x)

    def batch_norms(self) -> list[nn.BatchNorm2d]:
        """The BatchNorm layers the tail runs (its blocks' and `_bn1`), not the prefix's."""
        if self.net is None:
            return []
        return [m for m in [*self.blocks.modules(), self.net._bn1] if isinstance(m, nn.BatchNorm2d)]

    def use_batch_statistics(self, momentum: float | None, training: bool) -> None:
        """Its BatchNorm layers normalise with the batch's statistics while `training` (PyTorch's `momentum`)
        when the model says so (`momentum` not None); else always with their running statistics."""
        for bn in self.batch_norms() if momentum is not None else []:
            bn.momentum = momentum
            bn.train(training)

    def groups(self) -> dict[str, list[nn.Parameter]]:
        """Pretrained parameters of the tail (`backbone`) and the new head (`head`)."""
        head = list(self.head.parameters())
        ids = {id(p) for p in head}
        backbone = [p for p in self.parameters() if id(p) not in ids]
        if self.net is not None:
            backbone = [p for n, p in self.net.named_parameters()
                        if n.startswith(("_conv_head", "_bn1", "_fc")) and id(p) not in ids]
            backbone += [p for b in self.blocks for p in b.parameters()]
        return {"backbone": backbone, "head": head}


@dataclass
class Features:
    """Cached tensors at one cut, per split, and the labels."""

    x: dict[str, torch.Tensor]
    y: dict[str, torch.Tensor]

    def bytes_per_image(self) -> int:
        t = self.x["train"]
        return int(t[0].numel() * t.element_size())


@dataclass
class Result:
    choice: str
    recipe: str
    epochs: int
    test_curve: list[float] = field(default_factory=list)
    test: float = 0.0
    val: float = 0.0
    step_ms: float = 0.0
    bytes_per_image: int = 0
    diverged: bool = False


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _onnx_prefix(prefix: nn.Module, cache_dir: Path, threads: int):
    """The prefix exported once to ONNX and run by onnxruntime (several times faster than torch eager here)."""
    from edgetune.runtime.ort import onnxruntime

    ort = onnxruntime()

    path = cache_dir / f"lite0-prefix-b{EARLIEST}.onnx"
    if not path.exists():
        _say(f"exporting the prefix to {path} for onnxruntime...")
        program = torch.onnx.export(prefix, (torch.zeros(2, 3, 224, 224),), dynamo=True, input_names=["data"],
                                    output_names=["cut"], opset_version=18,
                                    dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
        program.save(str(path.with_suffix(".partial.onnx")))
        os.replace(path.with_suffix(".partial.onnx"), path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"data": x.numpy()})[0])


def extract(data: Path, cache_dir: Path, threads: int, engine: str = "torch",
            choices: tuple[str, ...] = ("head", "last-block", "last-stage")) -> tuple[dict[str, Features], int, str]:
    """Features at the cuts of `choices`: the prefix runs once per image; every cut is cached on disk.

    The earliest cut (the input of block 11) comes from the images; the later ones (block 15's
    input, the logits) from it, through the frozen blocks in between.

    Args:
        engine: what runs the prefix: `torch` (eager, the PyTorch peer's own cache) or `ort`
            (the prefix exported to ONNX: the same features within float32 rounding, faster).

    Returns:
        `{choice: Features}`, the number of classes, and the dataset's cache key.
    """
    net, info = create_backbone("efficientnet-lite0")
    ds = load_dataset(data, info.preprocessing)
    splits = {"train": ds.train, "test": ds.test, "validation": ds.validation}
    key = hashlib.sha256("".join(k for s in splits.values() for k in s.keys).encode()).hexdigest()[:16]
    cache_dir.mkdir(parents=True, exist_ok=True)
    prefix = Prefix(net, EARLIEST).eval()
    runner: list = [prefix] if engine == "torch" else []

    def earliest(name: str) -> torch.Tensor:
        split = splits[name]
        _say(f"extracting {name} ({len(split)} images) at the input of block {EARLIEST} with {engine}...")
        if not runner:
            runner.append(_onnx_prefix(prefix, cache_dir, threads))
        out, t0 = [], time.perf_counter()
        with torch.inference_mode():
            for start in range(0, len(split), EXTRACT_BATCH):
                out.append(runner[0](torch.from_numpy(split.images(range(start, min(start + EXTRACT_BATCH, len(split)))))))
        _say(f"  {len(split)} images in {time.perf_counter() - t0:.0f} s")
        return torch.cat(out)

    later = Prefix(net, FIRST_BLOCK["last-block"], start=EARLIEST).eval()
    rest = Tail(net, FIRST_BLOCK["last-block"], nn.Identity()).eval()
    cut = {"last-stage": ("b11", lambda n: earliest(n)),
           "last-block": ("b15", lambda n: _batched(later, load("last-stage", n))),
           "head": ("logits", lambda n: _batched(rest, load("last-block", n)))}

    def load(choice: str, name: str) -> torch.Tensor:
        tag, compute = cut[choice]
        path = cache_dir / f"{key}-{name}-{tag}.npy"
        if not path.exists():
            tmp = path.with_suffix(".partial.npy")
            np.save(tmp, compute(name).numpy())
            os.replace(tmp, path)
        return torch.from_numpy(np.load(path))

    ys = {name: torch.from_numpy(split.labels) for name, split in splits.items()}
    feats = {c: Features({n: load(c, n) for n in splits}, ys) for c in dict.fromkeys((*choices, "head"))}
    return feats, len(ds.class_names), key


def _batched(module: nn.Module, x: torch.Tensor, batch: int = 100) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([module(x[i:i + batch]) for i in range(0, len(x), batch)]).clone()


def batch_order(n: int, batch: int, steps: int, seed: int) -> Iterator[np.ndarray]:
    """Epochs of a seeded permutation, full batches across epoch ends: edgetune's Trainer order."""
    rng = np.random.Generator(np.random.PCG64(seed))
    order, cursor = rng.permutation(n), 0
    for _ in range(steps):
        take, have = [], 0
        while have < batch:
            if cursor == n:
                order, cursor = rng.permutation(n), 0
            k = min(batch - have, n - cursor)
            take.append(order[cursor:cursor + k])
            cursor, have = cursor + k, have + k
        yield np.concatenate(take)


def make_optimizer(recipe: Recipe, groups: dict[str, list[nn.Parameter]]) -> torch.optim.Optimizer:
    """The torch optimizer a recipe describes: the head at `lr`, the pretrained part at `lr * backbone_lr_scale`."""
    opt = recipe.optimizer
    param_groups = [{"params": groups["head"], "lr": opt.lr}]
    if groups["backbone"]:
        param_groups.append({"params": groups["backbone"], "lr": opt.lr * recipe.backbone_lr_scale})
    if isinstance(opt, Adam):
        return torch.optim.Adam(param_groups, lr=opt.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay)
    return torch.optim.SGD(param_groups, lr=opt.lr, momentum=opt.momentum, dampening=opt.dampening,
                           weight_decay=opt.weight_decay, nesterov=opt.nesterov)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.inference_mode():
        return float((_batched(model, x).argmax(1) == y).float().mean())


def finetune(choice: str, feats: Features, num_classes: int, recipe: Recipe, epochs: int, seed: int = 0,
             eval_every: int = 5, label: str = "") -> Result:
    """Train the tail of `choice` on the cached features; test accuracy every `eval_every` epochs."""
    net, _ = create_backbone("efficientnet-lite0")
    head_in = 1000
    tail = Tail(net, FIRST_BLOCK.get(choice), default_head(head_in, num_classes, seed=seed)).eval()
    for p in tail.parameters():
        p.requires_grad_(False)
    groups = tail.groups()
    for ps in groups.values():
        for p in ps:
            p.requires_grad_(True)
    opt = make_optimizer(recipe, groups)
    x, y = feats.x["train"], feats.y["train"]
    per_epoch = -(-len(x) // BATCH)
    res = Result(choice, label or recipe.describe(), epochs, bytes_per_image=feats.bytes_per_image())
    times = []
    schedule = make_schedule(recipe.schedule, epochs * per_epoch)  # over the run, as net_runner follows it
    bases = [g["lr"] for g in opt.param_groups]
    momentum = 1 - BN_MOMENTUM if recipe.batch_statistics else None  # export's, in PyTorch's convention
    for i, idx in enumerate(batch_order(len(x), BATCH, epochs * per_epoch, seed), 1):
        if schedule is not None:
            for g, base in zip(opt.param_groups, bases):
                g["lr"] = schedule.rate(i - 1, base)
        t0 = time.perf_counter()
        t = torch.from_numpy(idx)
        xb, yb = x[t], y[t]
        if recipe.mixup:  # edgetune's own draws for this seed and step: the Trainer's mix
            xb, yb = map(torch.from_numpy, mix(xb.numpy(), yb.numpy(), num_classes, recipe.mixup, seed, i - 1))
        tail.use_batch_statistics(momentum, True)
        loss = nn.functional.cross_entropy(tail(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        tail.use_batch_statistics(momentum, False)
        times.append(time.perf_counter() - t0)
        if not torch.isfinite(loss):
            res.diverged = True
            break
        if i % (per_epoch * eval_every) == 0:
            res.test_curve.append(round(accuracy(tail, feats.x["test"], feats.y["test"]), 4))
    res.test = accuracy(tail, feats.x["test"], feats.y["test"])
    res.val = accuracy(tail, feats.x["validation"], feats.y["validation"])
    res.step_ms = 1000 * float(np.median(times[5:] if len(times) > 10 else times))
    return res


def probe(feats: Features, cs: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)) -> dict:
    """Logistic regression on the frozen logits: C=1, and the C best on the test split (ties: the smaller).

    The recipe helper's `bench/probe.py` method: raw features (no standardisation: the head is a
    dense layer on them), multinomial L2, lbfgs to its own tolerance within 10000 iterations, in
    float64 on one BLAS thread (several times faster than float32 or more threads here).
    """
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    x = {n: t.numpy().astype(np.float64) for n, t in feats.x.items()}
    y = {n: t.numpy() for n, t in feats.y.items()}
    rows = {}
    for c in cs:
        with threadpool_limits(1):
            clf = LogisticRegression(C=c, max_iter=10000).fit(x["train"], y["train"])
        rows[c] = (clf.score(x["test"], y["test"]), clf.score(x["validation"], y["validation"]), int(clf.n_iter_[0]))
        _say(f"  probe C={c:g}: test {rows[c][0]:.3f} validation {rows[c][1]:.3f} ({rows[c][2]} iterations)")
    best = max(cs, key=lambda c: (rows[c][0], -c))
    return {"c1_test": rows[1.0][0], "c1_val": rows[1.0][1], "best_c": best, "best_test": rows[best][0],
            "best_val": rows[best][1], "all": {str(c): rows[c] for c in cs}}


def sweep_recipes(choice: str) -> list[Recipe]:
    """The grid searched per choice (the winners became `RECIPES`)."""
    if choice == "head":
        return [Recipe(SGD()), Recipe(SGD(lr=0.01)), Recipe(SGD(lr=0.03, dampening=0.0)), Recipe(Adam(lr=1e-3)),
                Recipe(Adam(lr=3e-3))]
    return [Recipe(Adam(lr=1e-3)), Recipe(Adam(lr=1e-3), 0.1), Recipe(Adam(lr=3e-4)), Recipe(Adam(lr=1e-3), 0.3),
            Recipe(SGD(lr=0.01, dampening=0.0), 0.1), Recipe(SGD(lr=0.003, dampening=0.0))]


def parse_recipe(text: str) -> Recipe:
    """`adam:LR[:SCALE[:WD]]` or `sgd:LR[:SCALE[:WD]]` (momentum 0.9, no dampening) as a `Recipe`."""
    kind, *nums = text.split(":")
    try:
        values = [float(v) for v in nums]
    except ValueError:
        values = []
    if kind not in ("adam", "sgd") or not 1 <= len(values) <= 3:
        raise argparse.ArgumentTypeError(f"bad recipe {text!r}: adam|sgd:LR[:BACKBONE_SCALE[:WEIGHT_DECAY]]")
    lr, scale, wd = (*values, 1.0, 0.0)[:3]
    opt = Adam(lr=lr, weight_decay=wd) if kind == "adam" else SGD(lr=lr, dampening=0.0, weight_decay=wd)
    return Recipe(opt, scale)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="prepared dataset (classes.txt + class folders)")
    p.add_argument("--choices", nargs="+", default=["head", "last-block", "last-stage"], choices=list(RECIPES))
    p.add_argument("--epochs", type=int, default=30, help="training epochs per run (default 30)")
    p.add_argument("--seed", type=int, default=0, help="head init and data order seed")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sweep", action="store_true", help="search the recipe grid instead of the default recipes")
    p.add_argument("--recipe", type=parse_recipe, action="append",
                   help="run this recipe instead (repeatable): adam|sgd:LR[:BACKBONE_SCALE[:WEIGHT_DECAY]]")
    p.add_argument("--mixup", type=float, metavar="ALPHA",
                   help="mixup strength of every run instead of its recipe's (0: off; last-block's recipe: 0.2)")
    p.add_argument("--batch-statistics", action=argparse.BooleanOptionalAction,
                   help="every run's tail BatchNorm trains with batch statistics, or with --no-batch-statistics "
                        "with the running ones, instead of as its recipe says (last-block's: batch statistics)")
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "edgetune" / "bench-finetune")
    p.add_argument("--out", type=Path, help="append every result as a JSON line")
    p.add_argument("--extract-with", choices=["torch", "ort"], default="torch",
                   help="what computes the cached features: torch eager (default) or onnxruntime (faster)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    feats, num_classes, key = extract(args.data, args.cache_dir, args.threads, args.extract_with, tuple(args.choices))
    probe_path = args.cache_dir / f"{key}-probe.json"
    if probe_path.exists():
        pr = json.loads(probe_path.read_text())
    else:
        pr = probe(feats["head"])
        probe_path.with_suffix(".partial").write_text(json.dumps(pr))
        os.replace(probe_path.with_suffix(".partial"), probe_path)
    _say(f"probe: C=1 test {pr['c1_test']:.3f} val {pr['c1_val']:.3f}; C={pr['best_c']} (best on test) "
         f"test {pr['best_test']:.3f} val {pr['best_val']:.3f}")
    results = []
    for choice in args.choices:
        recipes = args.recipe or (sweep_recipes(choice) if args.sweep else [RECIPES[choice]])
        if args.mixup is not None:
            recipes = [dataclasses.replace(r, mixup=args.mixup) for r in recipes]
        if args.batch_statistics is not None:
            recipes = [dataclasses.replace(r, batch_statistics=args.batch_statistics) for r in recipes]
        for recipe in recipes:
            res = finetune(choice, feats[choice], num_classes, recipe, args.epochs, args.seed)
            _say(f"{choice:10s} {res.recipe:34s} test {res.test:.3f} val {res.val:.3f} "
                 f"curve {res.test_curve} {res.step_ms:.1f} ms/step{' DIVERGED' if res.diverged else ''}")
            results.append(res)
            if args.out:
                with open(args.out, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"data": str(args.data), "seed": args.seed, **res.__dict__, "probe": pr}) + "\n")
    print(f"\n{args.data}: {len(feats['head'].x['train'])} train / {len(feats['head'].x['test'])} test / "
          f"{len(feats['head'].x['validation'])} validation, {args.epochs} epochs, batch {BATCH}, seed {args.seed}")
    print(f"linear probe on the frozen logits: C=1 val {pr['c1_val']:.3f}; C={pr['best_c']} (best on test) "
          f"val {pr['best_val']:.3f}\n")
    print("| choice | recipe | test acc | val acc | val - probe | ms/step (batch 32) | cache bytes/image |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r.choice} | {r.recipe} | {r.test:.3f} | {r.val:.3f} | {r.val - pr['best_val']:+.3f} | "
              f"{r.step_ms:.1f} | {r.bytes_per_image} |")


if __name__ == "__main__":
    main()
