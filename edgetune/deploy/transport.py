"""Where a package runs: here, on an adb device, or on an ssh host.

Every command is an argument list (never `shell=True`); the one string a remote shell parses is
built with `shlex.quote`, so folders and hosts with spaces, quotes or `;` pass through unchanged.
Every path handed to a tool (tar, ssh, adb, and rm, mkdir, cd, sh on the remote side) comes after
`--`, so a name starting with `-` is never read as an option. Before replacing the remote package
folder, the remote shell checks it exactly as `package.clean_package_dir` checks the local one
(`replace_guard`): an unrelated folder that happens to have the package's name is never removed.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path, PurePosixPath

from edgetune.deploy.package import MARKER, SCRIPTS
from edgetune.errors import UserError

REFUSED = 3  # exit status of `replace_guard` when the folder is not a package


class Local:
    """The package runs where it was built (the x86 target)."""

    def __init__(self) -> None:
        self.package: Path | None = None

    def push(self, package: Path) -> str:
        """Nothing to copy: the scripts run in `package` itself."""
        self.package = Path(package).resolve()
        return os.fspath(self.package)

    def run(self, script: str) -> int:
        """`sh script` in the package folder; output goes straight to ours."""
        return subprocess.run(["sh", "--", script], cwd=self.package).returncode


class Adb:
    """An Android device over adb: `adb push` into `remote_dir`, `adb shell` runs the scripts.

    The device needs a Python matching the bundled wheels on its PATH (or in $PYTHON).
    """

    def __init__(self, remote_dir: str = "/data/local/tmp", serial: str | None = None) -> None:
        self.adb = [_require("adb", "install Android platform-tools")] + (["-s", serial] if serial else [])
        self.remote_dir = remote_dir
        self.package = ""
        state = subprocess.run([*self.adb, "get-state"], capture_output=True, text=True)
        if state.returncode != 0 or state.stdout.strip() != "device":
            raise UserError(f"no adb device ready: {_last_line(state.stderr) or state.stdout.strip()}")

    def push(self, package: Path) -> str:
        """Replace `<remote_dir>/<package name>` on the device with `package`."""
        self.package = os.fspath(PurePosixPath(self.remote_dir) / Path(package).name)
        _check(subprocess.run([*self.adb, "shell", f"{replace_guard(self.package)} && "
                               f"mkdir -p -- {shlex.quote(self.remote_dir)}"], capture_output=True, text=True),
               "adb shell mkdir")
        _check(subprocess.run([*self.adb, "push", "--", os.fspath(Path(package).resolve()), self.remote_dir + "/"],
                              capture_output=True, text=True), "adb push")
        return self.package

    def run(self, script: str) -> int:
        """`adb shell` runs the script in the pushed package; returns its exit status."""
        command = f"cd -- {shlex.quote(self.package)} && sh -- {shlex.quote(script)}"
        return subprocess.run([*self.adb, "shell", command]).returncode


class Ssh:
    """A Linux host over ssh: the package streams over as a tar archive, ssh runs the scripts.

    Args:
        host: an ssh destination (`user@host` or a Host from the ssh config).
        remote_dir: the folder the package goes into (created); relative to the remote home.
        config: an ssh config file (`ssh -F`), e.g. with the port, key and known-hosts file.
        port: the remote port, when not in the config.
    """

    def __init__(self, host: str, remote_dir: str = ".", config: str | os.PathLike | None = None,
                 port: int | None = None) -> None:
        if not host or host.startswith("-"):
            raise UserError(f"bad ssh host {host!r}")
        self.ssh = [_require("ssh", "install openssh-client"), "-o", "BatchMode=yes", "-o", "ConnectTimeout=15"]
        if config is not None:
            self.ssh += ["-F", os.fspath(config)]
        if port is not None:
            self.ssh += ["-p", str(port)]
        self.ssh += ["--", host]
        self.host, self.remote_dir, self.package = host, remote_dir, ""
        probe = subprocess.run([*self.ssh, "true"], capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if probe.returncode != 0:
            raise UserError(f"cannot reach {host} over ssh: {_last_line(probe.stderr)}")

    def push(self, package: Path) -> str:
        """Stream `package` (without a local .venv or cache) as tar into `<remote_dir>/<name>`, replacing it."""
        package = Path(package).resolve()
        name = package.name
        self.package = os.fspath(PurePosixPath(self.remote_dir) / name)
        receive = (f"mkdir -p -- {shlex.quote(self.remote_dir)} && {replace_guard(self.package)} && "
                   f"tar -C {shlex.quote(self.remote_dir)} -xf -")
        tar = subprocess.Popen(["tar", "-C", os.fspath(package.parent), "--exclude", f"{name}/.venv",
                                "--exclude", f"{name}/cache", "-cf", "-", "--", name], stdout=subprocess.PIPE)
        done = subprocess.run([*self.ssh, receive], stdin=tar.stdout, capture_output=True, text=True)
        tar.stdout.close()
        if tar.wait() != 0:
            raise UserError(f"tar of {package} failed")
        _check(done, f"copying the package to {self.host}")
        return f"{self.host}:{self.package}"

    def run(self, script: str) -> int:
        """ssh runs the script in the copied package; returns its exit status."""
        command = f"cd -- {shlex.quote(self.package)} && sh -- {shlex.quote(script)}"
        return subprocess.run([*self.ssh, command], stdin=subprocess.DEVNULL).returncode


def replace_guard(path: str) -> str:
    """A POSIX shell command that removes the folder `path` only if `clean_package_dir` would empty it.

    The local rule (`edgetune.deploy.package.clean_package_dir`), checked on the remote side before
    anything there is removed: nothing at `path` is fine; a link is refused; otherwise it must be a
    folder that is empty, or holds the package marker, or holds all three scripts. Anything else
    makes the command print why on stderr and exit with status `REFUSED`.
    """
    p = shlex.quote(path)
    scripts = " && ".join(f"[ -f {p}/{shlex.quote(name)} ]" for name in SCRIPTS)
    refuse = shlex.quote(f"{path} exists and is not a package folder: refusing to replace it")
    return (f"{{ if [ -L {p} ]; then printf '%s\\n' {refuse} >&2; exit {REFUSED}; "
            f"elif [ -e {p} ]; then if [ -d {p} ] && {{ [ -z \"$(ls -A -- {p})\" ] || [ -f {p}/{shlex.quote(MARKER)} ] "
            f"|| {{ {scripts}; }}; }}; then rm -rf -- {p}; else printf '%s\\n' {refuse} >&2; exit {REFUSED}; fi; fi; }}")


def _require(tool: str, hint: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise UserError(f"{tool} not found on PATH: {hint}")
    return path


def _check(done: subprocess.CompletedProcess, what: str) -> None:
    if done.returncode != 0:
        raise UserError(f"{what} failed: {_last_line(done.stderr)}")


def _last_line(text: str) -> str:
    lines = [ln for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1] if lines else "no message"
