"""Cut one prepared dataset into per-device shards, each itself a prepared dataset.

A shard is a folder `edgetune prepare-data` could have written: the union's `classes.txt` and one
folder per class holding some of the union's images (hard links, or copies across file systems).
Every supernode's `--node-config` names one shard, so a device sees only its own class folders.

Shards keep whole *blocks* of five consecutive images of a class (in the loader's order). The
loader's split rule is per class by position (`i % 5`: 0 validation, 1 test, else train), so a
shard made of whole blocks splits its images exactly as the union does: the union's train split
is the disjoint union of the shards' train splits, and likewise for test and validation. A device
trains on its train split and reports accuracy on its test split; it never reads its validation
part, which the server evaluates as part of the union's validation split.

Which node gets which block is a partition rule (`PARTITIONS`): `iid` deals each class's blocks
out in a seeded random order; `by-class` gives each class to one node (class k to node k mod N)
except one block for every other node, because the loader needs every class folder to hold at
least one image (the class file, not the folder list, numbers the labels).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np

from edgetune.errors import UserError
from edgetune.runtime.dataset import Dataset

BLOCK = 5  # the loader's split period: a shard of whole blocks splits as the union does
CLASS_FILE = "classes.txt"
MANIFEST = "shards.json"

# (number of blocks of one class, class label, nodes, rng) -> owning node of each block
PartitionRule = Callable[[int, int, int, np.random.Generator], list[int]]
PARTITIONS: dict[str, PartitionRule] = {}


class Shard(NamedTuple):
    """One device's dataset folder and the size of its train split (its FedAvg weight)."""

    path: Path
    train: int


def register_partition(name: str) -> Callable[[PartitionRule], PartitionRule]:
    """Add a partition rule under `name` (the `--partition` choices come from this table)."""
    def add(rule: PartitionRule) -> PartitionRule:
        PARTITIONS[name] = rule
        return rule
    return add


@register_partition("iid")
def _iid(blocks: int, label: int, nodes: int, rng: np.random.Generator) -> list[int]:
    """Blocks in a seeded random order, dealt round-robin: every node gets ~1/N of every class."""
    owners = [0] * blocks
    for position, block in enumerate(rng.permutation(blocks)):
        owners[int(block)] = (position + label) % nodes  # the class offset spreads the remainders
    return owners


@register_partition("by-class")
def _by_class(blocks: int, label: int, nodes: int, rng: np.random.Generator) -> list[int]:
    """Class `label` goes to node `label % N`; every other node gets one block of it (non-empty folders)."""
    owner = label % nodes
    others = [n for n in range(nodes) if n != owner]
    chosen = rng.permutation(blocks)[:len(others)]
    owners = [owner] * blocks
    for node, block in zip(others, chosen):
        owners[int(block)] = node
    return owners


def class_blocks(dataset: Dataset) -> list[list[list[str]]]:
    """Per class, its blocks of image paths in the loader's order.

    Rebuilt from the three splits by the split rule (block b of a class = its validation image b,
    its test image b and its train images 3b..3b+2), so it holds for whatever files the loader
    kept and in whatever order it keeps them.
    """
    per_class: list[list[list[str]]] = []
    for label in range(len(dataset.class_names)):
        parts = [[p for p, lab in zip(split.paths, split.labels) if lab == label]
                 for split in (dataset.validation, dataset.test, dataset.train)]
        val, test, train = parts
        blocks = []
        for b in range(len(val)):
            blocks.append([val[b], *test[b:b + 1], *train[3 * b:3 * b + 3]])
        per_class.append(blocks)
    return per_class


def plan_shards(dataset: Dataset, nodes: int, partition: str = "iid", seed: int = 0) -> list[list[list[str]]]:
    """Which images each node gets: `plan[node][label]` = image paths in order.

    Raises:
        UserError: an unknown partition, fewer than one node, or a class with fewer blocks than nodes.
    """
    if partition not in PARTITIONS:
        raise UserError(f"unknown partition {partition!r} (known: {', '.join(PARTITIONS)})")
    if nodes < 1:
        raise UserError(f"nodes must be >= 1, got {nodes}")
    rule = PARTITIONS[partition]
    plan: list[list[list[str]]] = [[[] for _ in dataset.class_names] for _ in range(nodes)]
    for label, blocks in enumerate(class_blocks(dataset)):
        if len(blocks) < nodes:
            raise UserError(
                f"class {dataset.class_names[label]!r} has {sum(map(len, blocks))} usable images: {nodes} nodes "
                f"need at least {BLOCK * (nodes - 1) + 1} (every node's shard holds whole blocks of {BLOCK} "
                f"images of every class so that its 60/20/20 split is the union's)")
        rng = np.random.default_rng([seed, label])
        for block, owner in zip(blocks, rule(len(blocks), label, nodes, rng)):
            plan[owner][label].extend(block)
    return plan


def write_shards(dataset: Dataset, out_dir: str | os.PathLike, nodes: int, partition: str = "iid",
                 seed: int = 0) -> list[Shard]:
    """Write `out_dir/node_<i>/` for every node: the union's `classes.txt` and its share of each class.

    Reuses shards written before for the same dataset, node count, partition and seed (the
    manifest `out_dir/shards.json` says which); otherwise replaces them. Each set of shards is
    written in a temporary folder next to `out_dir` and renamed into place, so an interrupted
    run never leaves a half-written shard behind.

    Args:
        dataset: the union, as `edgetune.runtime.dataset.load_dataset` loaded it.
        out_dir: where the shard folders go.
        nodes: number of shards.
        partition: a `PARTITIONS` name.
        seed: seeds the block order.

    Returns:
        The shards, node 0 first.

    Raises:
        UserError: see `plan_shards`; or `out_dir` exists and was not written by this function.
    """
    out = Path(os.fspath(out_dir))
    manifest = {"data": os.path.abspath(dataset.root), "nodes": nodes, "partition": partition, "seed": seed,
                "images": sum(len(s) for s in (dataset.train, dataset.test, dataset.validation))}
    plan = plan_shards(dataset, nodes, partition, seed)
    # the split rule: position i of a class is train when i % 5 >= 2
    shards = [Shard(out / f"node_{i}", sum(sum(1 for k in range(len(p)) if k % BLOCK >= 2) for p in per_class))
              for i, per_class in enumerate(plan)]
    if (out / MANIFEST).is_file():
        try:
            if json.loads((out / MANIFEST).read_text(encoding="utf-8")) == manifest:
                return shards
        except (OSError, ValueError):
            pass  # unreadable manifest: write the shards again
    elif out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and holds no shards of ours ({MANIFEST} missing): choose another folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        root = Path(dataset.root)
        classes = (root / CLASS_FILE).read_bytes()
        for node, per_class in enumerate(plan):
            shard = tmp / f"node_{node}"
            shard.mkdir()
            (shard / CLASS_FILE).write_bytes(classes)
            for paths in per_class:
                for path in paths:
                    src = Path(path)
                    dst = shard / src.relative_to(root)
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    _link_or_copy(src, dst)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)  # ours: it has our manifest
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return shards


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link (no extra space), or a copy where links are impossible (another file system)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
