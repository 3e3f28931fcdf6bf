"""The secure path on Flower's legacy API: SecAgg+ (`secaggplus_mod` + `SecAggPlusWorkflow`).

Flower 1.42 implements SecAgg+ only for its legacy API: a `NumPyClient` inside a ClientApp with
`mods=[secaggplus_mod]`, and a ServerApp running `DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))`
around a legacy strategy; its Message API strategies refuse it. So this path uses the legacy API
while the plain path (message_app.py) uses the Message API. Both train with the same
`train_locally` and close rounds with the same `Federation`, so their aggregates agree to SecAgg+'s
quantization (the tests check 1e-5).

What the server sees differs, and so does what it can check: SecAgg+ hands the strategy only the
unmasked *sum*, never a device's own tensors. A device's update cannot be refused on its own; the
aggregate is checked instead (names, shapes, finite) and a bad one is refused as a whole, keeping
the previous global model. Each device clips its weighted tensors to +-`CLIPPING_RANGE` and
quantizes them to 2**22 levels before masking (Flower's defaults); `max_weight` bounds the example
count a device may report, and sets the weighting's precision.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common import Context, FitIns, FitRes, Parameters, Scalar, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import Grid, LegacyContext, ServerApp, ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

from edgetune.federated.device import check_update, train_locally
from edgetune.federated.serving import Federation
from edgetune.federated.settings import NodeSettings, RunSettings

CLIPPING_RANGE = 8.0  # SecAgg+'s default: tensors are clipped to +-8 before quantization
RECONSTRUCTION_THRESHOLD = 2 / 3  # of the shares: 2 of 3 devices, 7 of 10; fewer and the round halts


class DeviceClient(NumPyClient):
    """One device in the legacy API: `fit` is `train_locally` with tensors as an ordered list."""

    def __init__(self, node: NodeSettings) -> None:
        self.node = node

    def fit(self, parameters: list[np.ndarray], config: dict[str, Scalar]
            ) -> tuple[list[np.ndarray], int, dict[str, Scalar]]:
        names = json.loads(str(config["names"]))
        node = self.node
        result = train_locally(
            node.model, node.data, dict(zip(names, parameters, strict=True)), server_round=int(config["round"]),
            partition=node.partition_id, local_steps=int(config["local-steps"]), lr=float(config["lr"]) or None,
            seed=int(config["seed"]), cache_dir=node.cache_dir or None,
            state=node.state_path(str(config["federation"])), model_sha256=str(config["model-sha256"]))
        metrics = {"partition-id": node.partition_id, "train-loss": result.train_loss,
                   "test-accuracy": result.test_accuracy}
        return [result.parameters[n] for n in names], result.num_examples, metrics


def _client_fn(context: Context) -> Any:
    return DeviceClient(NodeSettings.from_config(context.node_config)).to_client()


client = ClientApp(client_fn=_client_fn, mods=[secaggplus_mod])
server = ServerApp()


class SecureFedAvg(FedAvg):
    """Legacy FedAvg for SecAgg+: round numbers after the resumed ones, and a checked aggregate."""

    def __init__(self, federation: Federation, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.federation = federation

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: ClientManager
                      ) -> list[tuple[ClientProxy, FitIns]]:
        chosen = super().configure_fit(server_round, parameters, client_manager)
        self.federation.sampled([proxy.node_id for proxy, _ in chosen])
        return chosen

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Scalar]]:
        fed = self.federation
        server_round += fed.first_round
        fed.missing({proxy.node_id for proxy, _ in results})
        for proxy, res in results:
            fed.accept(proxy.node_id, res.num_examples, dict(res.metrics))
        parameters, metrics = super().aggregate_fit(server_round, results, failures)
        if parameters is not None:
            reason = check_update(dict(zip(fed.names, parameters_to_ndarrays(parameters))), fed.model.expected, 1)
            if reason is not None:
                fed.refuse(server_round, None, reason)
                return None, metrics
        return parameters, metrics


@server.main()
def main(grid: Grid, context: Context) -> None:
    """The ServerApp: FedAvg through SecAgg+ for the rounds not done yet."""
    settings = RunSettings.from_config(context.run_config)
    fed = Federation(settings)
    if not fed.begin(grid):
        return
    names = fed.names

    def fit_config(server_round: int) -> dict[str, Scalar]:
        return {**fed.train_config(), "round": fed.first_round + server_round, "names": json.dumps(names)}

    def close_round(server_round: int, arrays: list[np.ndarray], config: dict[str, Scalar]
                    ) -> tuple[float, dict[str, Scalar]] | None:
        if server_round == 0:  # Flower's call before the first round: `begin` measured it already
            return None
        accuracy = fed.end_round(fed.first_round + server_round, dict(zip(names, arrays, strict=True)))
        return 1.0 - accuracy, {"accuracy": accuracy}  # legacy API wants a "loss": the error rate

    initial = fed.model.parameters()
    strategy = SecureFedAvg(fed, fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=settings.min_nodes,
                            min_available_clients=settings.min_nodes, on_fit_config_fn=fit_config,
                            evaluate_fn=close_round,
                            initial_parameters=ndarrays_to_parameters([initial[n] for n in names]))
    legacy = LegacyContext(context=context, strategy=strategy,
                           config=ServerConfig(num_rounds=fed.rounds_to_run, round_timeout=settings.round_timeout))
    workflow = DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(
        num_shares=1.0, reconstruction_threshold=RECONSTRUCTION_THRESHOLD, max_weight=settings.max_weight,
        clipping_range=CLIPPING_RANGE, timeout=settings.round_timeout))
    workflow(grid, legacy)
    fed.finish()
