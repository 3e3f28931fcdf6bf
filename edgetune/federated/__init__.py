"""Federated training of a `.tod` model's trainable part on Flower (`pip install 'edgetune[federated]'`).

Framework-free pieces are re-exported here; the Flower apps (`message_app`, `legacy_app`) and the
process launcher (`cluster`) import `flwr` and are imported by name where they are used.
"""

from edgetune.federated.coordinator import GlobalModel, RoundLog, global_path, read_round_log, saved_rounds
from edgetune.federated.device import LocalResult, check_update, train_locally
from edgetune.federated.settings import NodeSettings, RunSettings
from edgetune.federated.shards import PARTITIONS, Shard, plan_shards, write_shards

__all__ = [
    "GlobalModel", "LocalResult", "NodeSettings", "PARTITIONS", "RoundLog", "RunSettings", "Shard",
    "check_update", "global_path", "plan_shards", "read_round_log", "saved_rounds", "train_locally",
    "write_shards",
]
