"""The server side both Flower paths share: start or resume, wait for devices, and close each round.

`Federation` wraps the framework-free `GlobalModel` and `RoundLog` with what happens inside a
ServerApp: log lines through Flower's logger (they reach `flwr run --stream`), waiting for the
devices to connect, and the bookkeeping of who replied, who was refused and who failed in a round.
The strategies (message_app.py, legacy_app.py) call it; it never decides how to aggregate.
"""

from __future__ import annotations

import time
from logging import INFO, WARNING
from typing import Any

import numpy as np

from edgetune.errors import UserError
from edgetune.federated.coordinator import GlobalModel, RoundLog
from edgetune.federated.settings import RunSettings


class Federation:
    """One ServerApp run of edgetune: the global model, the round log and this round's replies.

    Args:
        settings: the run's settings (from `context.run_config`).
    """

    def __init__(self, settings: RunSettings) -> None:
        from flwr.supercore import log  # Flower's logger: its lines reach `flwr run --stream`

        self._log = log
        self.settings = settings
        self.model = GlobalModel(settings.model, settings.data, settings.out, settings.cache_dir or None)
        self.log = RoundLog(settings.out)
        self.first_round = self.model.round  # rounds already done (resumed from global_<r>.tod)
        self._reset_round()

    @property
    def rounds_to_run(self) -> int:
        """Rounds this run still has to do."""
        return max(0, self.settings.rounds - self.first_round)

    @property
    def names(self) -> list[str]:
        """Trainable tensor names in the model's order (the legacy API sends lists, not dicts)."""
        return list(self.model.expected)

    def train_config(self) -> dict[str, Any]:
        """What every device is told besides the tensors (the round number is added per round)."""
        s = self.settings
        return {"local-steps": s.local_steps, "lr": s.lr, "seed": s.seed, "federation": s.federation,
                "model-sha256": self.model.model_sha256}

    def begin(self, grid: Any) -> bool:
        """Log the start (fresh or resumed, with the starting accuracy) and wait for the devices.

        Returns:
            False when every round is already done (nothing to run).
        """
        s = self.settings
        accuracy = self.model.evaluate()
        self.log.write("start", round=self.first_round, rounds=s.rounds, accuracy=accuracy)
        how = f"resuming after round {self.first_round}" if self.first_round else "starting"
        self._log(INFO, "edgetune: %s, accuracy on validation data = %.4f", how, accuracy)
        if not self.rounds_to_run:
            self.log.write("done", round=self.first_round)
            return False
        deadline = time.monotonic() + s.wait_timeout
        while len(list(grid.get_node_ids())) < max(s.wait_nodes, s.min_nodes) and time.monotonic() < deadline:
            time.sleep(1)
        connected = len(list(grid.get_node_ids()))
        if connected < s.min_nodes:
            raise UserError(f"only {connected} devices connected within {s.wait_timeout:g} s; "
                            f"a round needs {s.min_nodes}")
        self._log(INFO, "edgetune: %d devices connected", connected)
        self._reset_round()
        return True

    def _reset_round(self) -> None:
        self._sampled: list[int] = []
        self.replies: list[dict[str, Any]] = []
        self.refused: list[dict[str, Any]] = []
        self.failures: list[dict[str, Any]] = []
        self._started = time.monotonic()

    def sampled(self, nodes: list[int]) -> None:
        """Note which devices this round's training messages went to."""
        self._sampled = list(nodes)

    def missing(self, replied: set[int]) -> None:
        """Note every sampled device without a reply (dead, or slower than the round timeout)."""
        for node in self._sampled:
            if node not in replied:
                self.fail(node, f"no reply within the round timeout ({self.settings.round_timeout:g} s)")

    def accept(self, node: int, examples: float, metrics: dict[str, Any]) -> None:
        """Note a device's usable reply."""
        self.replies.append({"node": node, "examples": examples, **metrics})

    def refuse(self, server_round: int, node: int | None, reason: str) -> None:
        """Leave an update out of the average, with one clear server log line saying why."""
        who = "the secure aggregate" if node is None else f"the update of node {node}"
        self._log(WARNING, "edgetune: round %d: refused %s: %s", server_round, who, reason)
        self.refused.append({"node": node, "reason": reason})

    def fail(self, node: int, reason: str) -> None:
        """Note a device whose reply is an error (it raised, or timed out)."""
        self.failures.append({"node": node, "reason": reason})

    def end_round(self, server_round: int, parameters: dict[str, np.ndarray] | None) -> float:
        """Close a round: take the aggregate (kept only if some update was usable), evaluate, save, log.

        Returns:
            The round's validation accuracy.
        """
        aggregated = bool(self.replies) and not any(r["node"] is None for r in self.refused)
        accuracy = self.model.finish_round(server_round, parameters if aggregated else None)
        weights = [r["examples"] for r in self.replies]
        means = {k: float(np.average([r[k] for r in self.replies], weights=weights))
                 for k in ("train-loss", "test-accuracy")} if self.replies else {}
        self.log.write("round", round=server_round, accuracy=accuracy, aggregated=aggregated,
                       replies=self.replies, refused=self.refused, failures=self.failures,
                       seconds=round(time.monotonic() - self._started, 2), **means)
        self._log(INFO, "edgetune: round %d: accuracy on validation data = %.4f (%d replies, %d refused, "
                  "%d failed)", server_round, accuracy, len(self.replies), len(self.refused), len(self.failures))
        self._reset_round()
        return accuracy

    def finish(self) -> None:
        """Log that the run reached its last round."""
        self.log.write("done", round=self.model.round)
