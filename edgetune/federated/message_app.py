"""The plain path on Flower's Message API: `client` (a ClientApp) and `server` (a ServerApp).

`flwr run` loads them by name (`edgetune.federated.message_app:server` / `:client`). The server
runs Flower's message-based `FedAvg` (weighted by each reply's `num-examples`) with two additions
of ours, both in `CheckedFedAvg`: the round numbers continue after a resumed round, and every
reply is checked before it is averaged (a device whose tensors have other names or shapes, are
not finite, or whose metrics are malformed is refused with one server log line, and the round
goes on with the others). Flower's central-evaluation hook (`evaluate_fn`, called after every
round with the new global tensors) is where the round is closed: evaluated on the union's
validation split, saved as `global_<r>.tod`, logged.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from edgetune.federated.device import check_update, train_locally
from edgetune.federated.serving import Federation
from edgetune.federated.settings import NodeSettings, RunSettings

METRICS = ("num-examples", "partition-id", "test-accuracy", "train-loss")  # what every reply reports

client = ClientApp()
server = ServerApp()


def to_record(parameters: dict[str, np.ndarray]) -> ArrayRecord:
    """Tensors by name -> Flower's ArrayRecord (names kept, so the server checks them by name)."""
    return ArrayRecord({name: Array(np.ascontiguousarray(a)) for name, a in parameters.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Flower's ArrayRecord -> tensors by name."""
    return {name: array.numpy() for name, array in record.items()}


@client.train()
def train(msg: Message, context: Context) -> Message:
    """One device, one round: train the global tensors locally and reply with them and the metrics."""
    node = NodeSettings.from_config(context.node_config)
    config = msg.content["config"]
    federation = str(config["federation"])
    result = train_locally(
        node.model, node.data, from_record(msg.content["arrays"]), server_round=int(config["server-round"]),
        partition=node.partition_id, local_steps=int(config["local-steps"]), lr=float(config["lr"]) or None,
        seed=int(config["seed"]), cache_dir=node.cache_dir or None, state=node.state_path(federation),
        model_sha256=str(config["model-sha256"]))
    metrics = MetricRecord({"num-examples": result.num_examples, "partition-id": node.partition_id,
                            "train-loss": result.train_loss, "test-accuracy": result.test_accuracy})
    return Message(RecordDict({"arrays": to_record(result.parameters), "metrics": metrics}), reply_to=msg)


class CheckedFedAvg(FedAvg):
    """Flower's FedAvg, numbering rounds after the resumed ones and refusing unusable replies."""

    def __init__(self, federation: Federation, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.federation = federation
        self._sent: list[Message] = []

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._sent = list(super().configure_train(self.federation.first_round + server_round, arrays, config, grid))
        self.federation.sampled([m.metadata.dst_node_id for m in self._sent])
        return self._sent

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        fed = self.federation
        server_round += fed.first_round
        # whom a reply is from: the node its message went to (Flower's own error replies, e.g. for a
        # node that stopped sending heartbeats, come from the superlink); message ids exist once pushed
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in self._sent}
        usable, replies = [], list(replies)
        nodes = [sent_to.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id) for msg in replies]
        fed.missing(set(nodes))
        for msg, node in zip(replies, nodes):
            if msg.has_error():
                fed.fail(node, msg.error.reason)
                usable.append(msg)  # FedAvg logs it and leaves it out
                continue
            reason, metrics = reply_problem(msg.content, fed.model.expected)
            if reason is not None:
                fed.refuse(server_round, node, reason)
                continue
            fed.accept(node, metrics.pop("num-examples"), metrics)
            usable.append(msg)
        return super().aggregate_train(server_round, usable)


def reply_problem(content: RecordDict, expected: dict[str, tuple[int, ...]]
                  ) -> tuple[str | None, dict[str, float]]:
    """(why a train reply cannot be averaged or None, its metrics)."""
    arrays, metrics = content.array_records, content.metric_records
    if list(arrays) != ["arrays"] or list(metrics) != ["metrics"]:
        return f"records {sorted(content)} instead of ['arrays', 'metrics']", {}
    values = dict(metrics["metrics"])
    if sorted(values) != sorted(METRICS):
        return f"metrics {sorted(values)} instead of {sorted(METRICS)}", {}
    if not all(isinstance(v, (int, float)) and np.isfinite(v) for v in values.values()):
        return f"metrics {values} are not all finite numbers", {}
    try:
        parameters = from_record(arrays["arrays"])
    except (TypeError, ValueError) as e:
        return f"unreadable tensors ({e})", {}
    return check_update(parameters, expected, values["num-examples"]), values


@server.main()
def main(grid: Grid, context: Context) -> None:
    """The ServerApp: FedAvg over the connected devices for the rounds not done yet."""
    settings = RunSettings.from_config(context.run_config)
    fed = Federation(settings)
    if not fed.begin(grid):
        return

    def close_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:  # Flower's call before the first round: `begin` measured it already
            return None
        accuracy = fed.end_round(fed.first_round + server_round, from_record(arrays))
        return MetricRecord({"accuracy": accuracy})

    strategy = CheckedFedAvg(fed, fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=settings.min_nodes,
                             min_available_nodes=settings.min_nodes)
    strategy.start(grid=grid, initial_arrays=to_record(fed.model.parameters()), num_rounds=fed.rounds_to_run,
                   timeout=settings.round_timeout, train_config=ConfigRecord(fed.train_config()),
                   evaluate_fn=close_round)
    fed.finish()
