"""Federated training, the parts that need no Flower processes: shards, a device's round, the server's
checks, resume, the round log, the settings and the command's user errors.

The end-to-end runs with real superlink / supernode processes are in test_federated_cluster.py.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from edgetune.errors import UserError
from edgetune.federated.coordinator import GlobalModel, RoundLog, global_path, read_round_log, saved_rounds
from edgetune.federated.device import check_update, round_seed, train_locally
from edgetune.federated.settings import NodeSettings, RunSettings
from edgetune.federated.shards import BLOCK, plan_shards, write_shards
from edgetune.runtime import TrainSession
from edgetune.runtime.dataset import load_dataset
from tests.fixtures_data import TINY_CLASSES, make_tiny_dataset
from tests.fixtures_runtime import TINY_SHAPE, tiny_model


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("fed") / "union")


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    from edgetune.runtime import format as tod_format

    path = tmp_path_factory.mktemp("fed-model") / "tiny.tod"
    return tod_format.save_file(tiny_model(head="dense", num_classes=TINY_CLASSES, batch_size=4), path)


def _union(data: Path, model: str):
    session = TrainSession.create(model)
    return load_dataset(data, session.preprocessing, num_classes=session.num_classes)


def _names(split) -> Counter:
    return Counter(os.path.join(Path(p).parent.name, Path(p).name) for p in split.paths)


# --- shards -------------------------------------------------------------------------------------
@pytest.mark.parametrize("partition", ["iid", "by-class"])
def test_shards_split_exactly_as_the_union(tmp_path, tiny_data, tiny_path, partition) -> None:
    union = _union(tiny_data, tiny_path)
    shards = write_shards(union, tmp_path / "shards", 3, partition)
    loaded = [_union(s.path, tiny_path) for s in shards]
    for name in ("train", "test", "validation"):
        together = sum((_names(d.split(name)) for d in loaded), Counter())
        assert together == _names(union.split(name)), name  # same images, none twice
    assert [s.train for s in shards] == [len(d.train) for d in loaded]
    per_node = [Counter(d.train.labels.tolist()) for d in loaded]
    if partition == "by-class":  # class k mostly on node k % 3; one block (3 train images) elsewhere
        for label in range(TINY_CLASSES):
            assert all(per_node[n][label] <= 3 for n in range(3) if n != label % 3)
            assert per_node[label % 3][label] >= 3 * 2
    else:
        for label in range(TINY_CLASSES):
            assert max(c[label] for c in per_node) - min(c[label] for c in per_node) <= 3


def test_shards_need_a_block_of_every_class_per_node(tiny_data, tiny_path) -> None:
    union = _union(tiny_data, tiny_path)  # 23 per class = 5 blocks
    assert len(plan_shards(union, 5)) == 5
    with pytest.raises(UserError, match=rf"6 nodes need at least {BLOCK * 5 + 1}"):
        plan_shards(union, 6)
    with pytest.raises(UserError, match="unknown partition"):
        plan_shards(union, 2, "dirichlet")


def test_shards_are_reused_replaced_and_never_written_over_foreign_files(tmp_path, tiny_data, tiny_path) -> None:
    union = _union(tiny_data, tiny_path)
    first = write_shards(union, tmp_path / "shards", 2)
    marker = next(first[0].path.glob("c0/*.bmp"))
    inode = marker.stat().st_ino
    assert write_shards(union, tmp_path / "shards", 2) == first  # same manifest: reused as they are
    assert marker.stat().st_ino == inode
    again = write_shards(union, tmp_path / "shards", 3, seed=1)  # another plan: replaced
    assert len(again) == 3 and not any(p.name.startswith(".") for p in tmp_path.iterdir())
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="holds no shards of ours"):
        write_shards(union, foreign, 2)
    assert (foreign / "notes.txt").read_text() == "keep me"


# --- a device's round ---------------------------------------------------------------------------
def test_a_device_round_is_reproducible_and_keeps_its_optimizer_state(tmp_path, tiny_data, tiny_path) -> None:
    start = TrainSession.create(tiny_path).parameters()
    kwargs = dict(server_round=1, partition=0, local_steps=6, lr=0.05, seed=3)
    a = train_locally(tiny_path, tiny_data, start, **kwargs)
    b = train_locally(tiny_path, tiny_data, start, **kwargs)
    assert all(np.array_equal(a.parameters[n], b.parameters[n]) for n in start)  # same round, same result
    assert a.num_examples == len(_union(tiny_data, tiny_path).train) and np.isfinite(a.train_loss)
    assert 0 <= a.test_accuracy <= 1
    other = train_locally(tiny_path, tiny_data, start, **{**kwargs, "server_round": 2})
    assert not np.array_equal(other.parameters["head.weight"], a.parameters["head.weight"])  # a fresh data order
    assert round_seed(0, 1, 0) != round_seed(0, 1, 1) != round_seed(0, 2, 1)

    state = tmp_path / "device.tod"
    train_locally(tiny_path, tiny_data, start, state=state, **kwargs)
    assert TrainSession.create(state).step == 6
    second = train_locally(tiny_path, tiny_data, a.parameters, state=state, **{**kwargs, "server_round": 2})
    assert TrainSession.create(state).step == 12  # the momentum of round 1 carried into round 2
    fresh = train_locally(tiny_path, tiny_data, a.parameters, **{**kwargs, "server_round": 2})
    assert not np.array_equal(second.parameters["head.weight"], fresh.parameters["head.weight"])


def test_a_device_trains_a_schedule_trained_model_at_its_base_rate(tmp_path, tiny_data, tiny_path) -> None:
    """A model a cosine trained ended at rate ~0 with its base saved (`training.base_lr`): a device
    round without --lr trains at that base, as `net_runner --schedule constant` would, not at ~0."""
    from edgetune.runtime import format as tod_format

    tod = tod_format.load_file(tiny_path)
    tod.meta["optimizer"]["lr"] = 0.0
    tod.meta.setdefault("training", {})["base_lr"] = 0.05
    annealed = tod_format.save_file(tod, tmp_path / "annealed.tod")
    start = TrainSession.create(tiny_path).parameters()
    kwargs = dict(server_round=1, partition=0, local_steps=6, seed=3)
    at_base = train_locally(annealed, tiny_data, start, **kwargs)
    at_lr = train_locally(tiny_path, tiny_data, start, lr=0.05, **kwargs)
    assert all(np.array_equal(at_base.parameters[n], at_lr.parameters[n]) for n in start)
    assert not np.array_equal(at_base.parameters["head.weight"], start["head.weight"])


def test_a_device_round_trains_with_the_global_models_running_statistics(tmp_path, tiny_data) -> None:
    """A model whose BatchNorm trains with batch statistics (last-block's recipe): devices send weights, not
    running statistics, so a round trains with the global model's statistics, exactly as the same model
    exported with frozen statistics does, and its device checkpoint keeps them as they were."""
    from edgetune.convert import convert
    from edgetune.host import TransferNet, default_head, export
    from tests.tiny_nets import TinyBackbone

    net = TransferNet(TinyBackbone(), default_head(6, TINY_CLASSES, seed=1))
    preprocessing = tiny_model().meta["preprocessing"]
    models = {}
    for name, statistics in [("batch", True), ("frozen", False)]:
        path = export(net, "backbone.dw,backbone.pw,backbone.fc", input_shape=TINY_SHAPE, preprocessing=preprocessing,
                      batch_size=4, path=tmp_path / f"{name}.onnx", batch_statistics=statistics)
        models[name] = convert(path, tmp_path / name)
    start = TrainSession.create(models["batch"]).parameters()
    kwargs = dict(server_round=1, partition=0, local_steps=4, lr=0.05, seed=3)
    batch = train_locally(models["batch"], tiny_data, start, state=tmp_path / "device.tod", **kwargs)
    frozen = train_locally(models["frozen"], tiny_data, start, **kwargs)
    assert all(np.array_equal(batch.parameters[n], frozen.parameters[n]) for n in start)
    assert not np.array_equal(batch.parameters["head.weight"], start["head.weight"])
    assert batch.test_accuracy == frozen.test_accuracy
    before = TrainSession.create(models["batch"]).checkpoint_state().buffers
    after = TrainSession.create(tmp_path / "device.tod").checkpoint_state().buffers
    assert before and all(np.array_equal(after[n], v) for n, v in before.items())


def test_a_device_refuses_another_model_and_bad_tensors(tiny_data, tiny_path) -> None:
    start = TrainSession.create(tiny_path).parameters()
    with pytest.raises(UserError, match="not the server's"):
        train_locally(tiny_path, tiny_data, start, server_round=1, partition=0, local_steps=1, model_sha256="0" * 64)
    with pytest.raises(UserError, match="head.weight"):
        train_locally(tiny_path, tiny_data, {**start, "head.weight": start["head.weight"][:, :2]},
                      server_round=1, partition=0, local_steps=1)


# --- the server's checks ------------------------------------------------------------------------
EXPECTED = {"head.weight": (3, 8), "head.bias": (3,)}
GOOD = {"head.weight": np.zeros((3, 8), np.float32), "head.bias": np.zeros(3, np.float32)}


@pytest.mark.parametrize("update, examples, reason", [
    (GOOD, 10, None),
    ({"head.weight": GOOD["head.weight"]}, 10, "tensors"),
    ({**GOOD, "extra": np.zeros(1)}, 10, "tensors"),
    ({**GOOD, "head.weight": np.zeros((3, 9), np.float32)}, 10, r"shape \(3, 9\)"),
    ({**GOOD, "head.bias": np.array([0, np.nan, 1], np.float32)}, 10, "1 non-finite"),
    ({**GOOD, "head.bias": np.array([np.inf, 0, 0], np.float32)}, 10, "1 non-finite"),
    ({**GOOD, "head.bias": np.zeros(3, np.int64)}, 10, "not floating"),
    (GOOD, 0, "num-examples"),
    (GOOD, float("nan"), "num-examples"),
])
def test_check_update(update, examples, reason) -> None:
    got = check_update(update, EXPECTED, examples)
    assert got is None if reason is None else got is not None and re.search(reason, got)


def test_the_message_app_refuses_malformed_replies() -> None:
    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    from edgetune.federated.message_app import reply_problem, to_record

    metrics = {"num-examples": 10, "partition-id": 0, "train-loss": 0.5, "test-accuracy": 0.9}

    def reply(arrays=GOOD, extra=None, **changed):
        content = RecordDict({"arrays": to_record(arrays), "metrics": MetricRecord({**metrics, **changed})})
        if extra:
            content["extra"] = extra
        return reply_problem(content, EXPECTED)[0]

    assert reply() is None
    assert "shape" in reply({**GOOD, "head.weight": np.zeros((8, 3), np.float32)})
    assert "non-finite" in reply({**GOOD, "head.bias": np.full(3, np.nan, np.float32)})
    assert "metrics" in reply(**{"train-loss": float("inf")})
    assert "records" in reply(extra=to_record(GOOD))
    assert "num-examples" in reply(**{"num-examples": -5})
    assert reply_problem(RecordDict({"config": ConfigRecord({"a": 1})}), EXPECTED)[0].startswith("records")


# --- resume and the round log -------------------------------------------------------------------
def test_the_server_resumes_from_its_newest_readable_round(tmp_path, tiny_data, tiny_path, capsys) -> None:
    out = tmp_path / "out"
    server = GlobalModel(tiny_path, tiny_data, out)
    assert server.round == 0 and 0 <= server.evaluate() <= 1
    params = {n: a + 0.5 for n, a in server.parameters().items()}
    accuracy = server.finish_round(1, params)
    assert saved_rounds(out) == [1]
    assert TrainSession.create(global_path(out, 1)).record["validation_accuracy"] == accuracy
    (out / "global_2.tod").write_bytes(b"not a model")  # cannot happen (atomic writes); still never used
    again = GlobalModel(tiny_path, tiny_data, out)
    assert again.round == 1 and all(np.array_equal(again.parameters()[n], params[n]) for n in params)
    assert "skipped" in capsys.readouterr().err
    other = tmp_path / "other.tod"
    from edgetune.runtime import format as tod_format

    tod_format.save_file(tiny_model(head="dense", num_classes=TINY_CLASSES, batch_size=4, seed=7), other)
    with pytest.raises(UserError, match="another model"):
        GlobalModel(other, tiny_data, out)


def test_round_log_survives_a_torn_line(tmp_path) -> None:
    log = RoundLog(tmp_path)
    log.write("start", round=0)
    with open(tmp_path / "rounds.jsonl", "ab") as f:
        f.write(b'{"event": "round", "rou')  # a crash mid-line
    events, offset = read_round_log(tmp_path)
    assert [e["event"] for e in events] == ["start"]
    log.write("round", round=1, accuracy=0.5)
    more, end = read_round_log(tmp_path, offset)
    assert [e["round"] for e in more] == [1] and end == (tmp_path / "rounds.jsonl").stat().st_size


# --- settings and the command -------------------------------------------------------------------
def test_settings_round_trip_through_toml() -> None:
    run = RunSettings(model="/m/a b.tod", data='/d/"q"', out="/o", rounds=3, federation="f", lr=0.01)
    assert RunSettings.from_config(tomllib.loads(run.to_toml())) == run
    node = NodeSettings(partition_id=2, data="/x", model="/m.tod")
    assert NodeSettings.from_config({**tomllib.loads(node.to_toml()), "fault": "nan"}) == node  # extra keys ignored
    with pytest.raises(UserError, match="'rounds' must be int"):
        RunSettings.from_config({**tomllib.loads(run.to_toml()), "rounds": "3"})
    with pytest.raises(UserError, match="has no 'data'"):
        NodeSettings.from_config({"partition-id": 1, "model": "/m"})


@pytest.mark.parametrize("args, message", [
    (["--nodes", "0"], "--nodes must be >= 1"),
    (["--secure-aggregation", "--nodes", "2"], "needs --nodes 3 or more"),
    (["--min-nodes", "5"], "--min-nodes must be between 1 and --nodes"),
    (["--model", "missing.tod"], "missing.tod"),
])
def test_user_mistakes_are_one_line_and_exit_2(tmp_path, tiny_data, tiny_path, capsys, args, message) -> None:
    from edgetune.cli.main import main

    base = ["federated", "local", "--model", tiny_path, "--data", str(tiny_data), "-o", str(tmp_path / "out")]
    assert main(base + args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and err[0].startswith("edgetune federated: error:")
    assert not (tmp_path / "out" / "work" / "flower").exists()  # nothing started


def test_one_output_folder_serves_one_run_at_a_time(tmp_path, tiny_data, tiny_path, capsys) -> None:
    import fcntl

    from edgetune.cli.main import main

    (tmp_path / "out" / "work").mkdir(parents=True)
    with open(tmp_path / "out" / "work" / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as a running `edgetune federated local -o out` holds it
        assert main(["federated", "local", "--model", tiny_path, "--data", str(tiny_data),
                     "-o", str(tmp_path / "out")]) == 2
    assert "another `edgetune federated` is running" in capsys.readouterr().err
    assert not (tmp_path / "out" / "work" / "shards").exists()


def test_the_command_help_does_not_import_flower() -> None:
    import subprocess
    import sys

    code = ("import sys\nfrom edgetune.cli.main import parse_args\ntry:\n    parse_args(['federated', 'local', '--help'])\n"
            "except SystemExit:\n    pass\nprint('flwr' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip().splitlines()[-1] == "False", proc.stderr
