"""Shared pytest fixtures for the deploy layer's tests: a real OpenSSH server and a wheel bundle."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

SSHD = "/usr/sbin/sshd"


@dataclass(frozen=True)
class SshServer:
    """A throwaway sshd on 127.0.0.1: connect with `ssh -F config host`."""

    host: str
    config: Path
    port: int


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", os.fspath(path)], check=True)


@pytest.fixture(scope="session")
def ssh_server(tmp_path_factory: pytest.TempPathFactory):
    """Debian's OpenSSH server with a generated host key, accepting one generated user key.

    Skips when sshd or ssh is missing (scripts/setup.sh installs openssh-server) or when sshd's
    privilege-separation directory cannot be made (not root and absent).
    """
    if not os.path.exists(SSHD) or shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        pytest.skip("OpenSSH server/client not installed (scripts/setup.sh installs openssh-server)")
    if not os.path.isdir("/run/sshd"):  # Debian's sshd needs it; systemd normally creates it
        try:
            os.makedirs("/run/sshd", mode=0o755)
        except OSError as e:
            pytest.skip(f"sshd's privilege separation directory /run/sshd is missing: {e}")
    d = tmp_path_factory.mktemp("sshd")
    _keygen(d / "host_key")
    _keygen(d / "user_key")
    shutil.copy(d / "user_key.pub", d / "authorized_keys")
    port = _free_port()
    user = os.environ.get("USER") or subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
        "PidFile none\n")
    (d / "ssh_config").write_text(
        f"Host edgetune-test\n  HostName 127.0.0.1\n  Port {port}\n  User {user}\n"
        f"  IdentityFile {d / 'user_key'}\n  IdentitiesOnly yes\n  StrictHostKeyChecking no\n"
        f"  UserKnownHostsFile {d / 'known_hosts'}\n  LogLevel ERROR\n")
    log = open(d / "sshd.log", "w")
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", os.fspath(d / "sshd_config")], stderr=log)
    server = SshServer(host="edgetune-test", config=d / "ssh_config", port=port)
    try:
        for _ in range(50):  # wait until it accepts connections (or died)
            if proc.poll() is not None:
                pytest.skip(f"sshd exited: {(d / 'sshd.log').read_text().strip()}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        yield server
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


@pytest.fixture(scope="session")
def x86_wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The device dependencies' wheels for x86 (pip's cache makes this a few seconds), built once."""
    from edgetune.deploy import bundle

    d = tmp_path_factory.mktemp("wheels-x86")
    bundle.download_device_wheels("x86", d)
    return d


@pytest.fixture(scope="session")
def mini_fashion_dir(fashion_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 10 images of each Fashion-MNIST class (100 in all: 60 train, 20 test, 20 validation).

    Small enough that a test extracts its features in seconds; same classes.txt as `fashion_dir`.
    """
    out = tmp_path_factory.mktemp("mini-fashion")
    shutil.copy(Path(fashion_dir) / "classes.txt", out / "classes.txt")
    for line in (Path(fashion_dir) / "classes.txt").read_text(encoding="utf-8").splitlines():
        folder = line.split("\t")[0]
        (out / folder).mkdir()
        for f in sorted((Path(fashion_dir) / folder).iterdir())[:10]:
            shutil.copy(f, out / folder / f.name)
    return out
