"""A Flower deployment on this machine: one `flower-superlink`, N `flower-supernode`s, `flwr run`.

Real processes on 127.0.0.1, as on a fleet (Flower's deployment runtime, not its simulation):
the superlink listens on one port, each supernode gets its own `--node-config` file (its data
folder, its model, its caches) and its own port for the ClientApp processes Flower starts per
message. Flower's own state stays in a private HOME / FLWR_HOME under the work folder, with
telemetry and update checks off, and `--disable-runtime-dependency-installation` (else the
superlink would run `uv sync` per run, which needs a package index).

Every process is started in its own session (process group), its descendants are remembered as
they appear, and `stop()` ends all of them (SIGTERM, then SIGKILL after a grace period); the
class is a context manager, so an error or Ctrl-C stops everything too. On Linux each child also
gets SIGTERM if this process dies without cleaning up (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

from edgetune import __version__
from edgetune.errors import UserError
from edgetune.federated.settings import NodeSettings, RunSettings

HOST = "127.0.0.1"
CONNECTION = "edgetune-local"  # the SuperLink connection name in FLWR_HOME/config.toml
# which ServerApp / ClientApp a run uses: the plain path (Message API) or SecAgg+ (legacy API)
APPS: dict[str, tuple[str, str]] = {
    "plain": ("edgetune.federated.message_app:server", "edgetune.federated.message_app:client"),
    "secure": ("edgetune.federated.legacy_app:server", "edgetune.federated.legacy_app:client"),
}
STOP_GRACE = 10.0  # seconds between SIGTERM and SIGKILL

APP_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "edgetune-federated"
version = "{version}"
description = "edgetune: federated training of a .tod model's trainable part"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "edgetune"

[tool.flwr.app.components]
serverapp = "{serverapp}"
clientapp = "{clientapp}"

[tool.flwr.app.config]
{config}"""


class FederationError(RuntimeError):
    """The Flower deployment failed (a process died, the run stopped early, or it stalled)."""


def write_app(app_dir: str | os.PathLike, settings: RunSettings, path: str = "plain", *,
              clientapp: str | None = None, modules: Mapping[str, str] | None = None) -> Path:
    """Write the Flower app folder `flwr run` packs and submits: a `pyproject.toml`, nothing else needed.

    The apps themselves are installed modules (`APPS`); the run's settings are the app's
    `[tool.flwr.app.config]`.

    Args:
        app_dir: the folder (created; its `pyproject.toml` is replaced).
        settings: the run's settings.
        path: "plain" or "secure" (an `APPS` key).
        clientapp: another ClientApp (`module:attribute`), e.g. one defined in `modules`.
        modules: extra Python files to ship in the app, name -> source.
    """
    if path not in APPS:
        raise UserError(f"unknown app {path!r} (known: {', '.join(APPS)})")
    serverapp, default_client = APPS[path]
    folder = Path(os.fspath(app_dir))
    folder.mkdir(parents=True, exist_ok=True)
    for name, source in (modules or {}).items():
        (folder / name).write_text(source, encoding="utf-8")
    (folder / "pyproject.toml").write_text(APP_PYPROJECT.format(
        version=__version__, serverapp=serverapp, clientapp=clientapp or default_client,
        config=settings.to_toml()), encoding="utf-8")
    return folder


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the parent dies (Linux), so nothing is orphaned."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not glibc Linux: stop() still ends every process


def _proc_stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a live process, from /proc; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in (b"Z", b"X"):  # a zombie is gone for our purpose
        return None
    return int(fields[1]), int(fields[19])


class LocalFederation:
    """A superlink and one supernode per `nodes` entry on 127.0.0.1; `submit` runs an app on them.

    Args:
        work_dir: private HOME / FLWR_HOME and per-node config files go here.
        nodes: each supernode's settings (its `--node-config`).
        log_dir: `superlink.log`, `node_<i>.log` and `run.log` (the ServerApp's streamed log).
        bin_dir: where `flower-superlink`, `flower-supernode` and `flwr` are (default: next to
            this Python, i.e. the venv's bin).
    """

    def __init__(self, work_dir: str | os.PathLike, nodes: Sequence[NodeSettings], log_dir: str | os.PathLike,
                 bin_dir: str | os.PathLike | None = None) -> None:
        self.work_dir = Path(os.fspath(work_dir)).absolute()
        self.log_dir = Path(os.fspath(log_dir)).absolute()
        self.nodes = list(nodes)
        self.bin_dir = Path(os.fspath(bin_dir)) if bin_dir else Path(sys.executable).parent
        for tool in ("flower-superlink", "flower-supernode", "flower-superexec", "flwr"):
            if not (self.bin_dir / tool).exists():
                raise UserError(f"{tool} not found in {self.bin_dir}: pip install 'edgetune[federated]'")
        home = self.work_dir / "home"
        self.env = {**os.environ, "HOME": str(home), "FLWR_HOME": str(home / ".flwr"),
                    "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                    "PATH": f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
                    # several device processes share few cores: one thread each
                    "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.port = 0
        self.superlink: subprocess.Popen | None = None
        self.supernodes: list[subprocess.Popen | None] = [None] * len(self.nodes)
        self.runs: list[subprocess.Popen] = []
        self._logs: list[IO[bytes]] = []
        self._seen: dict[int, int] = {}  # pid -> start time of every descendant seen

    # --- starting -------------------------------------------------------------------------------
    def __enter__(self) -> LocalFederation:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, ready_timeout: float = 60.0) -> None:
        """Start the superlink, wait until it accepts connections, then start every supernode."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        flwr_home = Path(self.env["FLWR_HOME"])
        flwr_home.mkdir(parents=True, exist_ok=True)
        self.start_superlink(ready_timeout)
        for i in range(len(self.nodes)):
            self.start_node(i)

    def start_superlink(self, ready_timeout: float = 60.0) -> None:
        """(Re)start the superlink (on the same port after a restart) and wait until it listens."""
        if not self.port:
            self.port = free_port()
            (Path(self.env["FLWR_HOME"]) / "config.toml").write_text(
                f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                f'address = "{HOST}:{self.port}"\ninsecure = true\n', encoding="utf-8")
        self.superlink = self._spawn(
            ["flower-superlink", "--insecure", "--host", HOST, "--port", str(self.port),
             "--disable-runtime-dependency-installation"], "superlink.log")
        deadline = time.monotonic() + ready_timeout
        while True:
            if self.superlink.poll() is not None:
                raise FederationError(f"flower-superlink exited with status {self.superlink.returncode}: "
                                      f"{self.log_tail('superlink.log')}")
            try:
                socket.create_connection((HOST, self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise FederationError(f"flower-superlink did not listen on {HOST}:{self.port} within "
                                          f"{ready_timeout:g} s: {self.log_tail('superlink.log')}") from None
                time.sleep(0.2)

    def start_node(self, i: int, settings: NodeSettings | None = None) -> subprocess.Popen:
        """(Re)start supernode `i`, optionally with new settings; it connects to the superlink by itself."""
        if settings is not None:
            self.nodes[i] = settings
        config = self.work_dir / f"node_{i}.toml"
        config.write_text(self.nodes[i].to_toml(), encoding="utf-8")
        proc = self._spawn(["flower-supernode", "--insecure", "--superlink", f"{HOST}:{self.port}", "--host", HOST,
                            "--port", str(free_port()), "--node-config", str(config)], f"node_{i}.log")
        self.supernodes[i] = proc
        return proc

    def submit(self, app_dir: str | os.PathLike) -> subprocess.Popen:
        """`flwr run APP edgetune-local --stream`: submit the app; the process ends when the run does.

        Its output (the ServerApp's log, streamed) goes to `run.log`.
        """
        proc = self._spawn(["flwr", "run", str(Path(os.fspath(app_dir)).absolute()), CONNECTION, "--stream"],
                           "run.log")
        self.runs.append(proc)
        return proc

    def _spawn(self, argv: list[str], log_name: str) -> subprocess.Popen:
        log = open(self.log_dir / log_name, "ab")
        self._logs.append(log)
        argv = [str(self.bin_dir / argv[0]), *argv[1:]]
        return subprocess.Popen(argv, cwd=self.work_dir, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent)

    def log_tail(self, log_name: str, lines: int = 5) -> str:
        """The last lines of one of our logs (for error messages)."""
        try:
            text = (self.log_dir / log_name).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])

    # --- watching and stopping ------------------------------------------------------------------
    def _ours(self) -> list[subprocess.Popen]:
        return [p for p in (self.superlink, *self.supernodes, *self.runs) if p is not None]

    def refresh(self) -> None:
        """Remember every live descendant of our processes (Flower's superexec, serverapp and
        clientapp processes), so `stop` finds them even after their parent died."""
        roots = {p.pid for p in self._ours()} | set(self._seen)
        try:
            pids = [int(d) for d in os.listdir("/proc") if d.isdigit()]
        except OSError:
            return
        stats = {pid: st for pid in pids if (st := _proc_stat(pid)) is not None}
        changed = True
        while changed:
            changed = False
            for pid, (ppid, start) in stats.items():
                if ppid in roots and pid not in roots:
                    roots.add(pid)
                    self._seen[pid] = start
                    changed = True

    def kill_node(self, i: int, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to supernode `i`'s process group (a crash is SIGKILL) and reap it."""
        self.refresh()
        proc = self.supernodes[i]
        if proc is not None and proc.poll() is None:
            _signal_group(proc.pid, sig)
            proc.wait(timeout=STOP_GRACE)

    def stop(self) -> None:
        """End every process started here and all their descendants: SIGTERM, then SIGKILL."""
        self.refresh()
        ours = self._ours()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for proc in ours:
                if proc.poll() is None:
                    _signal_group(proc.pid, sig)
            for pid, start in self._seen.items():
                if (st := _proc_stat(pid)) is not None and st[1] == start:
                    _signal_pid(pid, sig)
            deadline = time.monotonic() + STOP_GRACE
            while time.monotonic() < deadline and (
                    any(p.poll() is None for p in ours)
                    or any((st := _proc_stat(pid)) is not None and st[1] == start for pid, start in self._seen.items())):
                time.sleep(0.1)
        for proc in ours:
            try:
                proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
        for log in self._logs:
            log.close()
        self._logs.clear()

    def pids(self) -> set[int]:
        """Every process id started here or seen as a descendant (to check that none is left)."""
        self.refresh()
        return {p.pid for p in self._ours()} | set(self._seen)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # each of ours leads its own session: its group id is its pid
    except (ProcessLookupError, PermissionError):
        pass


def _signal_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
