"""What the server does around Flower's aggregation: start or resume, evaluate, save, log.

Framework-free, shared by both Flower paths. `GlobalModel` owns the global model on the server:
it starts from the `.tod`, or from the newest readable `OUT/global_<r>.tod` so that a restarted
server resumes after the last finished round; after every round it takes the aggregate, measures
accuracy on the validation split of the union (central evaluation on the server: the devices never
train on those images), and writes `OUT/global_<r>.tod` atomically (`TrainSession.save`), so a
crash at any moment leaves every finished round's model whole. `OUT/rounds.jsonl` gets one JSON
line per event (start, round), which is how `edgetune federated local` follows the run.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgetune.errors import UserError
from edgetune.runtime import Context, TrainSession
from edgetune.runtime.dataset import load_dataset
from edgetune.runtime.format import TodError
from edgetune.runtime.trainer import Trainer

GLOBAL_NAME = re.compile(r"^global_(\d+)\.tod$")
ROUND_LOG = "rounds.jsonl"


def global_path(out_dir: str | os.PathLike, server_round: int) -> Path:
    """`OUT/global_<round>.tod`."""
    return Path(os.fspath(out_dir)) / f"global_{server_round}.tod"


def saved_rounds(out_dir: str | os.PathLike) -> list[int]:
    """Round numbers of the `global_<r>.tod` files in `out_dir`, newest first."""
    out = Path(os.fspath(out_dir))
    if not out.is_dir():
        return []
    found = (GLOBAL_NAME.match(p.name) for p in out.iterdir())
    return sorted((int(m.group(1)) for m in found if m), reverse=True)


class GlobalModel:
    """The server's global model: where it starts, how good it is, and one saved `.tod` per round.

    Args:
        model: the `.tod` the federation starts from.
        data: the union dataset; its validation split is what every round is measured on.
        out_dir: where `global_<r>.tod` and `rounds.jsonl` go; earlier rounds found there are resumed.
        cache_dir: keeps the validation features across rounds and restarts.
    """

    def __init__(self, model: str | os.PathLike, data: str | os.PathLike, out_dir: str | os.PathLike,
                 cache_dir: str | os.PathLike | None = None) -> None:
        self.out_dir = Path(os.fspath(out_dir))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        ctx = Context(threads=1, cache_dir=cache_dir)
        base = TrainSession.create(model, ctx)
        self.expected = {name: a.shape for name, a in base.parameters().items()}
        self.round, self.session = 0, base
        for r in saved_rounds(self.out_dir):
            try:
                session = TrainSession.create(global_path(self.out_dir, r), ctx)
            except (TodError, OSError) as e:  # cannot happen with atomic writes; never resume from a bad file
                print(f"warning: skipped {global_path(self.out_dir, r)}: {e}", file=sys.stderr)
                continue
            self._check_same_model(base, session, global_path(self.out_dir, r))
            self.round, self.session = r, session
            break
        self.model_sha256 = base.model_sha256
        self.validation = load_dataset(data, base.preprocessing, num_classes=base.num_classes).validation

    @staticmethod
    def _check_same_model(base: TrainSession, saved: TrainSession, path: Path) -> None:
        shapes = {name: a.shape for name, a in saved.parameters().items()}
        if saved.model_sha256 != base.model_sha256 or shapes != {n: a.shape for n, a in base.parameters().items()}:
            raise UserError(f"{path} is the global model of another model than this run's: "
                            f"use another output folder")

    def parameters(self) -> dict[str, np.ndarray]:
        """The current global trainable tensors by name (copies)."""
        return self.session.parameters()

    def evaluate(self) -> float:
        """Accuracy of the current global model on the union's validation split."""
        trainer = Trainer(self.session, self.validation, None, test_every=0, target_accuracy=None)
        return trainer.evaluate("validation", self.validation)

    def finish_round(self, server_round: int, parameters: Mapping[str, np.ndarray] | None) -> float:
        """Take the round's aggregate (None: no usable update, the model stays), evaluate, save.

        Returns:
            The validation accuracy of the round's global model.
        """
        if parameters is not None:
            self.session.load_parameters(parameters)
        self.round = int(server_round)
        accuracy = self.evaluate()
        self.session.save(global_path(self.out_dir, self.round))
        return accuracy


class RoundLog:
    """Appends one JSON object per line to `OUT/rounds.jsonl`, flushed and fsynced line by line.

    A line is one event: `{"event": "start", ...}` when a server (re)starts, `{"event": "round",
    ...}` after each round. A crash mid-line leaves a partial last line; the next writer first
    ends it, and `read_round_log` skips it.
    """

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.path = Path(os.fspath(out_dir)) / ROUND_LOG

    def write(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append `{"event": event, "time": now, **fields}`; returns the object written."""
        entry = {"event": event, "time": round(time.time(), 3), **fields}
        line = json.dumps(entry, sort_keys=True, allow_nan=False) + "\n"
        with open(self.path, "a+b") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")
            f.write(line.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        return entry


def read_round_log(out_dir: str | os.PathLike, start: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Whole lines of `OUT/rounds.jsonl` from byte offset `start`.

    Returns:
        The events read (unparsable lines skipped) and the offset after the last whole line.
    """
    path = Path(os.fspath(out_dir)) / ROUND_LOG
    try:
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read()
    except FileNotFoundError:
        return [], start
    end = data.rfind(b"\n") + 1
    events = []
    for raw in data[:end].splitlines():
        try:
            entry = json.loads(raw)
        except ValueError:
            continue
        if isinstance(entry, dict):
            events.append(entry)
    return events, start + end
