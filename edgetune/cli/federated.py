"""`edgetune federated local`: federated training of a `.tod` on this machine, with Flower's real processes.

Cuts one prepared dataset into one shard per device, starts a `flower-superlink` and one
`flower-supernode` per shard on 127.0.0.1, submits the app with `flwr run`, prints
`round r: accuracy on validation data = V` after every round (the global model measured on the
validation split of the union, on the server) and writes `OUT/global_<r>.tod`. Every process it
started is stopped at the end, on an error and on Ctrl-C. Run it again with the same `-o` to
resume after the last finished round (or with a larger `--rounds` to go on).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.util
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgetune.errors import UserError
from edgetune.federated.shards import PARTITIONS

if TYPE_CHECKING:
    from edgetune.federated.cluster import LocalFederation
    from edgetune.runtime import TrainSession
    from edgetune.runtime.dataset import Dataset


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`edgetune federated local ...` (the only mode so far: a whole federation on this machine)."""
    sub = parser.add_subparsers(dest="mode", metavar="MODE", required=True)
    p = sub.add_parser("local", help="a superlink and N supernodes on 127.0.0.1, one dataset cut into N shards",
                       description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True, help="the .tod model to start from")
    p.add_argument("--data", type=Path, required=True, help="prepared dataset folder (classes.txt) to cut into shards")
    p.add_argument("--nodes", type=int, default=3, help="devices, one supernode each (default 3)")
    p.add_argument("--rounds", type=int, default=20, help="the last round to reach (default 20)")
    p.add_argument("--local-steps", type=int, default=10, help="optimizer steps per device per round (default 10)")
    p.add_argument("--partition", choices=sorted(PARTITIONS), default="iid",
                   help="iid: every device gets ~1/N of every class (default); by-class: each class lives "
                        "mostly on one device")
    p.add_argument("--secure-aggregation", action="store_true",
                   help="Flower's SecAgg+: the server sees only the sum of the devices' updates (needs 3+ nodes)")
    p.add_argument("--lr", type=float, help="the devices' constant learning rate (default: the model's; "
                                            "its schedule's base rate if one trained it)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shards and of every device's data order (default 0)")
    p.add_argument("--min-nodes", type=int,
                   help="a round needs this many devices (default: a majority of --nodes; 2 with 3 nodes)")
    p.add_argument("--round-timeout", type=float, default=300.0,
                   help="seconds a round waits for replies; a slower device is left out of it (default 300)")
    p.add_argument("--baseline", action="store_true",
                   help="also train centrally on the union with the same recipe and total steps, and print it")
    p.add_argument("-o", "--output", type=Path, required=True,
                   help="folder for global_<r>.tod, rounds.jsonl, logs/ and work/ (shards, caches, Flower's home)")


def run(args: argparse.Namespace) -> int:
    """Check the inputs, cut the shards, run the federation, print each round; 0 on success, 1 if it failed."""
    from edgetune.federated.cluster import FederationError

    _check_args(args)
    try:
        with _terminate_as_exit():
            return _run_local(args)
    except FederationError as e:
        print(f"edgetune federated: error: {e}", file=sys.stderr)
        return 1


def _check_args(args: argparse.Namespace) -> None:
    if importlib.util.find_spec("flwr") is None:
        raise UserError("Flower is not installed: pip install 'edgetune[federated]'")
    for name in ("nodes", "rounds", "local_steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.min_nodes is None:
        args.min_nodes = args.nodes // 2 + 1
    if not 1 <= args.min_nodes <= args.nodes:
        raise UserError(f"--min-nodes must be between 1 and --nodes ({args.nodes}), got {args.min_nodes}")
    if args.secure_aggregation and (args.nodes < 3 or args.min_nodes < 2):
        raise UserError("--secure-aggregation needs --nodes 3 or more and --min-nodes 2 or more: with two "
                        "devices each could subtract its own update from the sum and read the other's")
    if args.lr is not None and not args.lr > 0:
        raise UserError(f"--lr must be > 0, got {args.lr}")
    if not args.round_timeout > 0:
        raise UserError(f"--round-timeout must be > 0, got {args.round_timeout}")


class _terminate_as_exit:
    """SIGTERM / SIGHUP raise SystemExit while the federation runs, so `finally` blocks stop the processes."""

    def __enter__(self) -> None:
        def handler(signum: int, frame: Any) -> None:
            raise SystemExit(128 + signum)

        self._old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}

    def __exit__(self, *exc: object) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)


def _run_local(args: argparse.Namespace) -> int:
    from edgetune.federated.coordinator import global_path
    from edgetune.runtime import TrainSession
    from edgetune.runtime.dataset import load_dataset

    out = args.output.absolute()
    model = args.model.absolute()
    session = TrainSession.create(model)
    union = load_dataset(args.data, session.preprocessing, num_classes=session.num_classes)
    with _exclusive(out / "work"):
        done = _federate(args, out, model, session, union)
    print(f"federated: done, round {done} of {args.rounds}: {global_path(out, done)}")
    if args.baseline:
        _baseline(args, model, union)
    return 0


def _federate(args: argparse.Namespace, out: Path, model: Path, session: TrainSession, union: Dataset) -> int:
    """Shards, settings, the app, the cluster; follow the run to its end. Returns the last round done."""
    from edgetune.federated.cluster import LocalFederation, write_app
    from edgetune.federated.settings import NodeSettings, RunSettings
    from edgetune.federated.shards import write_shards

    work = out / "work"
    shards = write_shards(union, work / "shards", args.nodes, args.partition, args.seed)
    federation = hashlib.sha256(f"{out}\n{session.model_sha256}".encode()).hexdigest()[:16]
    settings = RunSettings(
        model=str(model), data=str(Path(union.root).absolute()), out=str(out), rounds=args.rounds,
        federation=federation, local_steps=args.local_steps, lr=args.lr or 0.0, seed=args.seed,
        min_nodes=args.min_nodes, wait_nodes=args.nodes, round_timeout=args.round_timeout,
        cache_dir=str(work / "cache" / "server"), max_weight=float(max(s.train for s in shards)))
    nodes = [NodeSettings(partition_id=i, data=str(s.path), model=str(model), cache_dir=str(work / "cache" / f"node_{i}"),
                          state_dir=str(work / "state" / f"node_{i}")) for i, s in enumerate(shards)]
    app = write_app(work / "app", settings, "secure" if args.secure_aggregation else "plain")
    print(f"federated: {args.nodes} devices ({args.partition} shards of {union.root}: "
          f"{', '.join(str(s.train) for s in shards)} train images), {args.rounds} rounds of "
          f"{args.local_steps} local steps, {'SecAgg+' if args.secure_aggregation else 'plain'} FedAvg; "
          f"logs in {out / 'logs'}", flush=True)
    offset = (out / "rounds.jsonl").stat().st_size if (out / "rounds.jsonl").exists() else 0
    stall = settings.wait_timeout + settings.round_timeout + 120.0  # startup slack on a busy machine
    with LocalFederation(work / "flower", nodes, out / "logs") as fed:
        proc = fed.submit(app)
        print(f"federated: superlink on 127.0.0.1:{fed.port} and {args.nodes} supernodes started, run submitted",
              flush=True)
        done = _follow(fed, proc, out, offset, stall, args.rounds)
        try:
            proc.wait(timeout=30)  # `flwr run` ends once the run is marked finished
        except subprocess.TimeoutExpired:
            pass  # the run is done and saved; stopping it is the with-block's job
    return int(done["round"])


@contextlib.contextmanager
def _exclusive(work: Path) -> Iterator[None]:
    """Hold `work/.lock`: two runs on one output folder would share shards, caches and rounds."""
    work.mkdir(parents=True, exist_ok=True)
    with open(work / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another `edgetune federated` is running with -o {work.parent}") from None
        yield


def _follow(fed: LocalFederation, proc: subprocess.Popen, out: Path, offset: int, stall: float, rounds: int) -> dict[str, Any]:
    """Print the server's events as `rounds.jsonl` grows until its "done" event, which is returned.

    Raises:
        FederationError: the superlink or the run died first, or no round finished for `stall` s.
    """
    from edgetune.federated.cluster import FederationError
    from edgetune.federated.coordinator import read_round_log

    last = time.monotonic()
    while True:
        events, offset = read_round_log(out, offset)
        for event in events:
            last = time.monotonic()
            if event["event"] == "done":
                return event
            _show(event, out)
        if fed.superlink.poll() is not None:
            raise FederationError(f"flower-superlink exited (status {fed.superlink.returncode}) after "
                                  f"{_last_round(out)}: see {out / 'logs' / 'superlink.log'}; run the same "
                                  f"command again to resume")
        if proc.poll() is not None:
            time.sleep(1)  # the last lines may still be on their way to the file
            if not read_round_log(out, offset)[0]:
                raise FederationError(f"the run ended after {_last_round(out)}, before round {rounds}: "
                                      f"see {out / 'logs' / 'run.log'}: {fed.log_tail('run.log')}")
            continue
        if time.monotonic() - last > stall:
            raise FederationError(f"no round finished for {stall:g} s: see {out / 'logs'}")
        fed.refresh()
        time.sleep(0.5)


def _last_round(out: Path) -> str:
    """'round r' of the newest saved global model, for error messages."""
    from edgetune.federated.coordinator import saved_rounds

    rounds = saved_rounds(out)
    return f"round {rounds[0]}" if rounds else "no round"


def _show(event: dict[str, Any], out: Path) -> None:
    """Print one event of `rounds.jsonl`: the round line, and who was refused or failed."""
    from edgetune.federated.coordinator import global_path

    r = event["round"]
    if event["event"] == "start":
        if r:
            print(f"resuming after round {r} ({global_path(out, r)}): accuracy on validation data = "
                  f"{event['accuracy']:g}", flush=True)
        else:
            print(f"round 0: accuracy on validation data = {event['accuracy']:g}", flush=True)
        return
    for refused in event.get("refused", []):
        who = "the secure aggregate" if refused["node"] is None else f"node {refused['node']}"
        print(f"round {r}: refused {who}: {refused['reason']}", flush=True)
    for failed in event.get("failures", []):
        print(f"round {r}: node {failed['node']} left out: {failed['reason']}", flush=True)
    print(f"round {r}: accuracy on validation data = {event['accuracy']:g}", flush=True)


def _baseline(args: argparse.Namespace, model: Path, union: Dataset) -> None:
    """Centralized training on the union: same optimizer, learning rate, batch and total steps."""
    from edgetune.runtime import Context, TrainSession
    from edgetune.runtime.trainer import Trainer

    steps = args.rounds * args.local_steps * args.nodes
    session = TrainSession.create(model, Context(cache_dir=args.output.absolute() / "work" / "cache" / "server"))
    if args.lr:
        session.learning_rate = args.lr
    trainer = Trainer(session, union.train, union.test, seed=args.seed, test_every=0, target_accuracy=None)
    trainer.fit(steps)
    accuracy = trainer.evaluate("validation", union.validation)
    print(f"centralized on the union (same recipe, {steps} steps): accuracy on validation data = {accuracy:g}")
