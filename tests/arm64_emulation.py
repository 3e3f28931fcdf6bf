"""Run arm64 Python on this x86 machine with QEMU user-mode emulation: the harness of test_arm64_emulated.

Nothing here is registered with the kernel (no binfmt_misc, nothing under /proc/sys): every arm64
program is started as `qemu-aarch64 -cpu cortex-a76 -L ROOTFS PROGRAM ...`, where ROOTFS is a
Debian bookworm arm64 userland (Python 3.11, the Python the bundle's wheels are built for) that
`mmdebstrap --variant=extract` unpacks without running any arm64 code (and without root). It is
built once per machine into the user's cache folder and reused.

Two consequences of going without binfmt shape the rest:
- an emulated process cannot start another arm64 program ("Exec format error"), so `python -m venv`
  with pip fails (ensurepip runs pip in a child process). `venv --without-pip` works, and pip runs
  from Debian's own pip wheel inside the emulated venv (which is what ensurepip would do), installing
  the bundle's wheels without starting anything;
- onnxruntime's CPU detection reads /proc/cpuinfo, which would be the host's x86 one; `-L` serves
  ROOTFS/proc/cpuinfo first, so a Cortex-A76 (a phone core, matching `-cpu`) is described there.

This lives with the tests, not in the package: it needs Debian's qemu-user and mmdebstrap and it
papers over emulation artefacts (the cpuinfo), so it checks the arm64 build, it is no device.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

SUITE = "bookworm"  # the Debian release whose python3.11 matches the bundle's cp311 wheels
PACKAGES = ("python3.11", "libstdc++6", "libgomp1", "python3-pip-whl")  # pip's wheel: as ensurepip uses
CPU = "cortex-a76"
# /proc/cpuinfo of a 2019-2021 phone's big core (Cortex-A76, ARMv8.2-A), one entry per host CPU
CPUINFO_ENTRY = ("processor\t: {index}\nBogoMIPS\t: 38.40\n"
                 "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid "
                 "asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\nCPU architecture: 8\n"
                 "CPU variant\t: 0x4\nCPU part\t: 0xd0b\nCPU revision\t: 1\n")
# chrootless: extract needs no chroot, so this works without root, user namespaces or fakechroot
MMDEBSTRAP = ("mmdebstrap", "--quiet", "--mode=chrootless", "--variant=extract", "--arch=arm64",
              f"--include={','.join(PACKAGES)}")
BUILD_TIMEOUT = 900  # seconds for mmdebstrap (downloads ~25 MB of .debs)
_DONE = ".edgetune-rootfs"  # written last, before the rename: a rootfs without it is never used


class EmulationUnavailable(RuntimeError):
    """A tool the emulation needs is missing (scripts/setup.sh installs them)."""


def qemu_binary() -> str:
    """The QEMU user-mode emulator for aarch64: Debian's qemu-user (or qemu-user-static)."""
    for name in ("qemu-aarch64", "qemu-aarch64-static"):
        found = shutil.which(name)
        if found:
            return found
    raise EmulationUnavailable("qemu-aarch64 not found: apt-get install --no-install-recommends qemu-user")


def cache_root() -> Path:
    """Where the arm64 userland is kept between runs: `$XDG_CACHE_HOME/edgetune` (default ~/.cache)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgetune"


def debian_sources(sources_dir: str | os.PathLike = "/etc/apt") -> list[str]:
    """One-line apt entries for `SUITE` (and -updates, -security) on the Debian mirrors this machine uses.

    Reads sources.list, sources.list.d/*.list and deb822 sources.list.d/*.sources; keeps the `deb`
    entries of the host's own release and its -updates/-security suites that carry `main` (third-party
    repositories have their own suite names or components), renamed to `SUITE`. Empty when none is
    found: mmdebstrap then uses deb.debian.org.
    """
    sources_dir = Path(sources_dir)
    entries: list[tuple[str, str, list[str]]] = []
    files = [sources_dir / "sources.list", *sorted((sources_dir / "sources.list.d").glob("*.list"))]
    for path in files:
        if path.is_file():
            entries += _one_line_entries(path.read_text(encoding="utf-8", errors="replace"))
    for path in sorted((sources_dir / "sources.list.d").glob("*.sources")):
        entries += _deb822_entries(path.read_text(encoding="utf-8", errors="replace"))
    codename = _host_codename()
    lines = []
    for uri, suite, components in entries:
        base, _, pocket = suite.partition("-")
        if base == codename and pocket in ("", "updates", "security") and "main" in components:
            line = f"deb {uri} {SUITE}{'-' + pocket if pocket else ''} main"
            if line not in lines:
                lines.append(line)
    return lines


def _host_codename() -> str:
    try:
        text = Path("/etc/os-release").read_text(encoding="utf-8")
    except OSError:
        return SUITE
    found = re.search(r"^VERSION_CODENAME=\"?([a-z]+)", text, re.M)
    return found[1] if found else SUITE


def _one_line_entries(text: str) -> list[tuple[str, str, list[str]]]:
    out = []
    for line in text.splitlines():
        line = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0])  # options such as [signed-by=...]
        words = line.split()
        if len(words) >= 4 and words[0] == "deb":
            out.append((words[1], words[2], words[3:]))
    return out


def _deb822_entries(text: str) -> list[tuple[str, str, list[str]]]:
    out = []
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    for stanza in re.split(r"\n\s*\n", "\n".join(lines)):
        fields: dict[str, str] = {}
        key = None
        for line in stanza.splitlines():
            if line[:1].isspace() and key:  # a continuation line
                fields[key] += " " + line.strip()
            elif ":" in line:
                key, value = line.split(":", 1)
                key = key.strip().lower()
                fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes").lower() == "no":
            continue
        for uri in fields.get("uris", "").split():
            for suite in fields.get("suites", "").split():
                out.append((uri, suite, fields.get("components", "").split()))
    return out


def rootfs(root: str | os.PathLike | None = None) -> Path:
    """The arm64 userland, built on first use into `root` (default `cache_root()`) and reused after.

    The build goes into a temporary sibling folder that is renamed into place only when complete, so
    an interrupted build is never reused; leftovers of dead builds are removed. Two concurrent first
    builds both finish and the second discards its copy.

    Returns:
        The folder holding the userland (`usr/bin/python3.11`, `proc/cpuinfo`).
    """
    root = Path(root or cache_root())
    key = hashlib.sha256(repr((SUITE, MMDEBSTRAP, CPUINFO_ENTRY)).encode()).hexdigest()[:12]
    final = root / f"arm64-rootfs-{SUITE}-{key}"
    if (final / _DONE).is_file():
        return final
    if shutil.which("mmdebstrap") is None:
        raise EmulationUnavailable("mmdebstrap not found: apt-get install --no-install-recommends mmdebstrap")
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f".{final.name}.partial-*"):
        pid = stale.name.rsplit("-", 1)[1]
        if not (pid.isdigit() and Path(f"/proc/{pid}").exists()):
            shutil.rmtree(stale, ignore_errors=True)
    partial = root / f".{final.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        cmd = [*MMDEBSTRAP, SUITE, os.fspath(partial), *debian_sources()]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise RuntimeError(f"mmdebstrap failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        pip_wheels = list(partial.glob("usr/share/python-wheels/pip-*.whl"))
        if not (partial / "usr/bin/python3.11").is_file() or not pip_wheels:
            raise RuntimeError(f"mmdebstrap made {partial} without python3.11 or pip's wheel")
        (partial / "proc").mkdir(exist_ok=True)
        cpus = os.cpu_count() or 1
        (partial / "proc/cpuinfo").write_text("\n".join(CPUINFO_ENTRY.format(index=i) for i in range(cpus)))
        (partial / _DONE).write_text(" ".join(cmd) + "\n")
        try:
            partial.rename(final)
        except OSError:
            if not (final / _DONE).is_file():  # not a concurrent build that won: a real failure
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return final


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without what would leak host Python or QEMU settings into a run.

    `PYTHONPATH` would make the emulated Python import the checkout instead of the installed wheel.
    """
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "QEMU_")) and k not in ("VIRTUAL_ENV", "PIP_REQUIRE_VIRTUALENV")}
    env.update(extra)
    return env


@dataclass(frozen=True)
class Emulator:
    """Starts arm64 programs of `rootfs` under qemu user-mode emulation."""

    rootfs: Path
    qemu: str
    cpu: str = CPU

    def command(self, program: str | os.PathLike, *args: str) -> list[str]:
        """The host command that runs the arm64 `program` (a host path) with `args`."""
        return [self.qemu, "-cpu", self.cpu, "-L", os.fspath(self.rootfs), os.fspath(program), *args]

    def run(self, program: str | os.PathLike, *args: str, timeout: float,
            cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
        """Run `program` emulated, capturing its output; killed after `timeout` seconds."""
        return subprocess.run(self.command(program, *args), capture_output=True, text=True, timeout=timeout,
                              cwd=cwd, env=clean_env(), stdin=subprocess.DEVNULL)

    def make_env(self, env_dir: str | os.PathLike, wheels: str | os.PathLike, requirement: str,
                 timeout: float) -> Path:
        """Create an arm64 venv at `env_dir`, install `requirement` from `wheels` into it, all emulated.

        Returns:
            A launcher script (`env_dir/python-arm64`) that runs the venv's Python under qemu: a host
            program that stands in for the interpreter (EDGETUNE_PYTHON for the package's scripts).
        """
        env_dir = Path(env_dir).resolve()
        system_python = self.rootfs / "usr/bin/python3.11"
        made = self.run(system_python, "-m", "venv", "--without-pip", os.fspath(env_dir), timeout=timeout)
        _check(made, "python -m venv --without-pip (emulated)")
        pip_wheel = sorted(self.rootfs.glob("usr/share/python-wheels/pip-*.whl"))[-1]
        python = env_dir / "bin" / "python"
        # --no-compile: bytecode for every module of numpy and onnxruntime would cost a minute emulated;
        # what is imported gets compiled on first use anyway
        installed = self.run(python, f"{pip_wheel}/pip", "install", "-q", "--no-compile", "--no-index",
                             "--find-links", os.fspath(Path(wheels).resolve()), requirement, timeout=timeout)
        _check(installed, "pip install from the bundle (emulated)")
        launcher = env_dir / "python-arm64"
        launcher.write_text("#!/bin/sh\nexec " + shlex.join(self.command(python)) + ' "$@"\n')
        launcher.chmod(0o755)
        return launcher


def _check(done: subprocess.CompletedProcess, what: str) -> None:
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed ({done.returncode}): {(done.stderr or done.stdout).strip()[-2000:]}")


def elf_machine(path: str | os.PathLike) -> int:
    """The e_machine field of an ELF file (62 x86-64, 183 aarch64)."""
    with open(path, "rb") as f:
        head = f.read(20)
    if head[:4] != b"\x7fELF":
        raise ValueError(f"{path} is not an ELF file")
    return int.from_bytes(head[18:20], "little")
