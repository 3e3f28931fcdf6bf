"""Federated training with Flower's real processes on 127.0.0.1: a superlink, supernodes, `flwr run`.

Every test bounds its waits, and every process it starts is stopped also when it fails
(LocalFederation is a context manager; the command-line runs are killed by process group).
Flower polls every ~3 s, so a round costs 5-15 s however small the model: the tests use few
rounds, the tiny model where the point does not need Lite0, and one cluster for two checks.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgetune.federated.cluster import LocalFederation, write_app
from edgetune.federated.coordinator import global_path, read_round_log, saved_rounds
from edgetune.federated.settings import NodeSettings, RunSettings
from edgetune.federated.shards import write_shards
from edgetune.runtime import TrainSession
from edgetune.runtime.dataset import load_dataset
from tests.fixtures_data import TINY_CLASSES, make_tiny_dataset
from tests.fixtures_runtime import tiny_model

pytestmark = pytest.mark.slow

ROUND_LINE = re.compile(r"^round (\d+): accuracy on validation data = ([0-9.]+)$")

# A ClientApp for the fault test: edgetune's own ClientApp, except that partition 3 sends back a
# non-finite tensor in odd rounds and a wrongly shaped one in even rounds. Shipped inside the app (FAB).
FAULTY_CLIENT = '''
import numpy as np
from flwr.clientapp import ClientApp
from edgetune.federated.message_app import from_record, to_record, train as honest_train

app = ClientApp()


@app.train()
def train(msg, context):
    reply = honest_train(msg, context)
    if int(context.node_config["partition-id"]) == 3:
        tensors = from_record(reply.content["arrays"])
        w = tensors["head.weight"]
        odd = int(msg.content["config"]["server-round"]) % 2
        tensors["head.weight"] = np.full_like(w, np.nan) if odd else np.zeros((w.shape[0], w.shape[1] + 1), w.dtype)
        reply.content["arrays"] = to_record(tensors)
    return reply
'''


# --- helpers ------------------------------------------------------------------------------------
def wait_for_event(out: Path, accept, timeout: float, fed: LocalFederation | None = None) -> dict:
    """The first event of `out/rounds.jsonl` for which `accept(event)` is true (bounded wait)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events, _ = read_round_log(out)
        for event in events:
            if accept(event):
                return event
        if fed is not None:
            fed.refresh()
            assert fed.superlink is not None and fed.superlink.poll() is None, fed.log_tail("superlink.log")
        time.sleep(0.2)
    raise AssertionError(f"no such event in {out / 'rounds.jsonl'} within {timeout:g} s: {read_round_log(out)[0]}")


def rounds_of(out: Path) -> dict[int, dict]:
    return {e["round"]: e for e in read_round_log(out)[0] if e["event"] == "round"}


def partitions(event: dict) -> set[int]:
    return {int(r["partition-id"]) for r in event["replies"]}


def descendants(pid: int) -> dict[int, str]:
    """Live descendants of `pid`: pid -> command line."""
    parents, cmd = {}, {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_bytes().rsplit(b")", 1)[1].split()
                line = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except (OSError, IndexError):
                continue  # exited while being read: both facts or neither
            parents[int(d)], cmd[int(d)] = int(stat[1]), line
    found, frontier = {}, {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier and p not in found}
        found.update({p: cmd[p] for p in frontier})
    return found


def alive(pids) -> list[int]:
    out = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if state not in (b"Z", b"X"):
            out.append(pid)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny model, a 3-class union of 8x8 BMPs (45 per class) and 3 IID shards of it."""
    from edgetune.runtime import format as tod_format

    root = tmp_path_factory.mktemp("fed-cluster")
    model = tod_format.save_file(tiny_model(head="dense", num_classes=TINY_CLASSES, batch_size=4), root / "tiny.tod")
    union = make_tiny_dataset(root / "union", per_class=45)
    session = TrainSession.create(model)
    shards = write_shards(load_dataset(union, session.preprocessing, num_classes=TINY_CLASSES), root / "shards", 3)
    return {"root": root, "model": model, "union": union, "shards": [s.path for s in shards],
            "max_train": max(s.train for s in shards)}


def node(tiny: dict, partition: int, shard: int) -> NodeSettings:
    base = tiny["root"] / "nodes" / f"p{partition}"
    return NodeSettings(partition_id=partition, data=str(tiny["shards"][shard]), model=tiny["model"],
                        cache_dir=str(base / "cache"), state_dir=str(base / "state"))


def settings(tiny: dict, out: Path, **changes) -> RunSettings:
    base = dict(model=tiny["model"], data=str(tiny["union"]), out=str(out), rounds=1, federation=out.name,
                local_steps=3, lr=0.05, min_nodes=3, wait_nodes=3, wait_timeout=60.0, round_timeout=120.0,
                max_weight=float(tiny["max_train"]))  # SecAgg+'s weighting is most precise at the largest count
    return RunSettings(**{**base, **changes})


@pytest.fixture(scope="module")
def cluster(tiny: dict):
    """One superlink and four supernodes of the tiny model: partitions 0-2 honest, 3 for the fault test."""
    nodes = [node(tiny, i, i) for i in range(3)] + [node(tiny, 3, 0)]
    with LocalFederation(tiny["root"] / "flower", nodes, tiny["root"] / "logs") as fed:
        yield fed
        pids = fed.pids()
    assert not alive(pids), "processes left running"


# --- the tests ----------------------------------------------------------------------------------
def test_faulty_devices_are_refused_and_a_killed_device_rejoins(tiny, cluster) -> None:
    """Partition 3 sends NaNs (odd rounds) or a wrong shape (even rounds): each time it is refused with
    one server log line and the round goes on with the others. Partition 2 is killed (SIGKILL) as round 2 starts: round
    2 completes with partitions 0 and 1; restarted, it rejoins with a new node id."""
    fed, out = cluster, tiny["root"] / "faults"
    run = settings(tiny, out, rounds=4, min_nodes=2, wait_nodes=4)
    app = write_app(tiny["root"] / "app-faults", run, "plain", clientapp="faulty_client:app",
                    modules={"faulty_client.py": FAULTY_CLIENT})
    try:
        proc = fed.submit(app)
        first = wait_for_event(out, lambda e: e["event"] == "round" and e["round"] == 1, 180, fed)
        fed.kill_node(2)  # round 2's messages are out; its ClientApp cannot have answered within this poll
        assert partitions(first) == {0, 1, 2}
        old_id = next(r["node"] for r in first["replies"] if r["partition-id"] == 2)
        second = wait_for_event(out, lambda e: e["event"] == "round" and e["round"] == 2, 200, fed)
        fed.start_node(2)
        assert partitions(second) == {0, 1} and second["aggregated"]
        assert [f["node"] for f in second["failures"]] == [old_id], second["failures"]
        wait_for_event(out, lambda e: e["event"] == "done", 400, fed)
        proc.wait(timeout=60)
    finally:
        fed.kill_node(3, signal.SIGTERM)  # a graceful stop: it leaves the federation at once
    rounds = rounds_of(out)
    assert sorted(rounds) == [1, 2, 3, 4] and all(e["aggregated"] for e in rounds.values())
    rejoined = [r for e in rounds.values() if e["round"] >= 3 for r in e["replies"] if r["partition-id"] == 2]
    assert rejoined and all(r["node"] != old_id for r in rejoined)
    for r, event in rounds.items():
        assert len(event["refused"]) == 1, event["refused"]
        assert ("non-finite" if r % 2 else "shape") in event["refused"][0]["reason"]
    server_lines = [line for line in (tiny["root"] / "logs" / "run.log").read_text().splitlines()
                    if "refused the update of node" in line]
    assert len(server_lines) == 4, server_lines  # one line per refused update, one per round
    assert all(re.search(r"round \d: refused the update of node \d+: head\.weight has", line) for line in server_lines)
    assert all(np.isfinite(TrainSession.create(global_path(out, r)).parameters()["head.weight"]).all()
               for r in rounds)


def test_secure_aggregation_equals_plain_fedavg(tiny, cluster) -> None:
    """One round from the same start on the same three devices, once plain (Message API) and once
    through SecAgg+ (legacy API): the global models agree within 1e-5."""
    fed = cluster
    results = {}
    for path in ("plain", "secure"):
        out = tiny["root"] / f"agg-{path}"
        proc = fed.submit(write_app(tiny["root"] / f"app-{path}", settings(tiny, out), path))
        done = wait_for_event(out, lambda e: e["event"] == "done", 240, fed)
        proc.wait(timeout=60)
        assert done["round"] == 1 and partitions(rounds_of(out)[1]) == {0, 1, 2}
        results[path] = TrainSession.create(global_path(out, 1)).parameters()
    start = TrainSession.create(tiny["model"]).parameters()
    for name, plain in results["plain"].items():
        assert np.abs(plain - start[name]).max() > 1e-3  # the round did move the model
        assert np.abs(results["secure"][name] - plain).max() <= 1e-5, name
    log = (tiny["root"] / "logs" / "run.log").read_text()
    assert "Secure aggregation completed" in log


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "edgetune.cli.main", "federated", "local", *args]


def test_a_killed_server_resumes_from_its_last_global_model(tiny, tmp_path) -> None:
    """`edgetune federated local` whose superlink is SIGKILLed after round 2 stops every process and
    exits 1; run again, it resumes from the last global_<r>.tod; every round's model stays readable."""
    out = tmp_path / "out"
    args = _cli("--model", tiny["model"], "--data", str(tiny["union"]), "--nodes", "3", "--rounds", "3",
                "--local-steps", "3", "--lr", "0.05", "--round-timeout", "120", "-o", str(out))
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    seen: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 240
        while not (out / "global_2.tod").exists():
            assert time.monotonic() < deadline and proc.poll() is None, "round 2 never finished"
            seen.update(descendants(proc.pid))
            time.sleep(0.2)
        seen.update(descendants(proc.pid))
        superlink = [pid for pid, cmd in seen.items() if "flower-superlink" in cmd]
        assert len(superlink) == 1, seen
        os.kill(superlink[0], signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 1, stderr
    assert stderr.strip().splitlines()[-1].startswith("edgetune federated: error: "), stderr
    deadline = time.monotonic() + 15  # Flower's own children notice their parent is gone within seconds
    while alive(seen) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not alive(seen), {p: seen[p] for p in alive(seen)}
    done = saved_rounds(out)
    assert done and done[0] >= 2 and sorted(done) == list(range(1, done[0] + 1))
    before = {r: global_path(out, r).read_bytes() for r in done}
    for r in done:
        TrainSession.create(global_path(out, r))  # every saved round is a whole, loadable model

    again = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    lines = again.stdout.splitlines()
    assert any(line.startswith(f"resuming after round {done[0]} ") for line in lines), lines
    printed = [int(m.group(1)) for line in lines if (m := ROUND_LINE.match(line))]
    assert printed == list(range(done[0] + 1, 4)), lines
    assert saved_rounds(out) == [3, 2, 1]
    assert all(global_path(out, r).read_bytes() == data for r, data in before.items())  # nothing redone
    starts = [e for e in read_round_log(out)[0] if e["event"] == "start"]
    assert [e["round"] for e in starts] == [0, done[0]]


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 128 + signal.SIGTERM)])
def test_ctrl_c_or_sigterm_stops_every_process(tiny, tmp_path, sig, status) -> None:
    """Interrupted while its supernodes are up, the command stops all of them and their children."""
    # rounds enough that the run cannot end before the signal; SIGINT as a terminal delivers it: a test
    # run started in the background by a shell (`cmd &`) inherits SIGINT ignored, and so would the CLI
    args = _cli("--model", tiny["model"], "--data", str(tiny["union"]), "--nodes", "3", "--rounds", "1000",
                "-o", str(tmp_path / "out"))
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 120
        while sum("flower-supernode" in cmd for cmd in seen.values()) < 3 or not (tmp_path / "out" / "logs" / "run.log").exists():
            assert time.monotonic() < deadline and proc.poll() is None, "the supernodes never started"
            seen.update(descendants(proc.pid))
            time.sleep(0.2)
        seen.update(descendants(proc.pid))
        proc.send_signal(sig)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == status
    deadline = time.monotonic() + 15
    while alive(seen) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not alive(seen), {p: seen[p] for p in alive(seen)}


def test_lite0_iid_federation_matches_centralized_training(lite0_tod, fashion_dir, tmp_path) -> None:
    """3 devices, IID shards of the 100-per-class demo data, Lite0: after 8 rounds of 25 local steps
    the global model is within 2 points of centralized training on the union with the same recipe
    (SGD of the model, lr 0.01, batch 32) and the same total steps (8 x 25 x 3 = 600)."""
    out = tmp_path / "out"
    proc = subprocess.run(_cli("--model", str(lite0_tod), "--data", str(fashion_dir), "--nodes", "3", "--rounds", "8",
                               "--local-steps", "25", "--lr", "0.01", "--baseline", "-o", str(out)),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    print(proc.stdout)  # the curve, for the record (pytest -s)
    curve = {int(m.group(1)): float(m.group(2)) for line in proc.stdout.splitlines() if (m := ROUND_LINE.match(line))}
    assert sorted(curve) == list(range(9))
    central = float(re.search(r"centralized on the union \(same recipe, 600 steps\): accuracy on validation data = "
                              r"([0-9.]+)", proc.stdout).group(1))
    assert central >= 0.8 and curve[0] < 0.3
    assert abs(curve[8] - central) <= 0.02, (curve, central)
    assert TrainSession.create(global_path(out, 8)).record["validation_accuracy"] == pytest.approx(curve[8])
    events = rounds_of(out)
    assert all(partitions(e) == {0, 1, 2} and not e["refused"] for e in events.values())
    with open(out / "rounds.jsonl") as f:
        assert all(json.loads(line)["event"] in ("start", "round", "done") for line in f)
