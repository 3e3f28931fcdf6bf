"""The two configurations a Flower run of edgetune reads: the run's (server) and each node's (device).

One source of truth for every key: `edgetune federated local` writes them (the run's into the
app's `[tool.flwr.app.config]`, each node's into a TOML file given to `flower-supernode
--node-config`), and the ServerApp and ClientApp read them back with `from_config`. Keys are
Flower-style (dashes); values are TOML scalars (a string "" or number 0 means "not set").
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from edgetune.errors import UserError

T = TypeVar("T", bound="_TomlSettings")
_KINDS: dict[str, type] = {"str": str, "int": int, "float": float, "bool": bool}  # TOML scalars


class _TomlSettings:
    """Dataclass <-> flat TOML table with dashed keys (what Flower's run and node configs are)."""

    @classmethod
    def from_config(cls: type[T], config: Mapping[str, Any]) -> T:
        """Read the settings from a Flower config (`context.run_config` / `context.node_config`).

        Raises:
            UserError: a key is missing or has the wrong type (the message names it).
        """
        values = {}
        for f in fields(cls):  # type: ignore[arg-type]
            key = f.name.replace("_", "-")
            if key not in config:
                if f.default is dataclasses.MISSING:
                    raise UserError(f"the Flower config has no {key!r} (it has {sorted(config)})")
                continue
            value, kind = config[key], _KINDS[str(f.type)]
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise UserError(f"config {key!r} must be {kind.__name__}, got {value!r}")
            values[f.name] = value
        return cls(**values)

    def to_toml(self) -> str:
        """`key = value` lines: JSON's strings, numbers and booleans are valid TOML basic values."""
        lines = []
        for f in fields(self):  # type: ignore[arg-type]
            lines.append(f"{f.name.replace('_', '-')} = {json.dumps(getattr(self, f.name))}")
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class RunSettings(_TomlSettings):
    """What the ServerApp needs: the model, the union data, where results go, and the schedule.

    Attributes:
        model: the starting `.tod` (absolute path on the server).
        data: the union dataset; its validation split measures every round.
        out: where `global_<r>.tod` and `rounds.jsonl` go (earlier rounds there are resumed).
        rounds: the last round to reach (a resumed run does only the missing ones).
        federation: an id the devices key their own state by (stable across server restarts).
        local_steps: optimizer steps per device per round.
        lr: the devices' learning rate; 0 keeps the model's (the base rate if a schedule trained it).
        seed: seeds every device's data order (with the round and its partition).
        min_nodes: a round needs this many devices; fewer and Flower waits for more.
        wait_nodes: at the start, wait (up to `wait_timeout`) until this many devices are connected.
        wait_timeout: seconds to wait for `wait_nodes` devices before starting with those there.
        round_timeout: seconds a round waits for replies; a device slower than that is left out.
        cache_dir: where the server keeps its validation features ("" in memory).
        max_weight: SecAgg+ only: the largest example count a device may report (precision of
            the secure weighting; the CLI sets it to the largest shard's train split).
    """

    model: str
    data: str
    out: str
    rounds: int
    federation: str
    local_steps: int = 10
    lr: float = 0.0
    seed: int = 0
    min_nodes: int = 2
    wait_nodes: int = 0
    wait_timeout: float = 120.0
    round_timeout: float = 300.0
    cache_dir: str = ""
    max_weight: float = 1000.0

    def __post_init__(self) -> None:
        for name in ("rounds", "local_steps", "min_nodes"):
            if getattr(self, name) < 1:
                raise UserError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.lr < 0 or self.round_timeout <= 0 or self.wait_timeout < 0 or self.max_weight <= 0:
            raise UserError(f"lr, timeouts and max-weight must be positive: {self}")


@dataclass(frozen=True)
class NodeSettings(_TomlSettings):
    """What one device (supernode) has of its own: its data, its copy of the model, its state.

    Attributes:
        partition_id: which shard this is (seeds the data order; kept when the node restarts).
        data: this device's prepared dataset.
        model: this device's `.tod` (must be the server's model).
        cache_dir: where it keeps its frozen features across rounds ("" in memory).
        state_dir: where it keeps its own checkpoint per federation, so its optimizer state
            carries across rounds ("" none: every round starts from `model`'s optimizer state).
    """

    partition_id: int
    data: str
    model: str
    cache_dir: str = ""
    state_dir: str = ""

    def state_path(self, federation: str) -> str | None:
        """This device's checkpoint for one federation, or None without a state folder."""
        if not self.state_dir:
            return None
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in federation)[:80] or "default"
        os.makedirs(self.state_dir, exist_ok=True)
        return os.path.join(self.state_dir, f"{safe}.tod")
