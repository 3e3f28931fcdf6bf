"""The offline runtime bundle: edgetune's own wheel plus the device wheels for the target.

The device installs from this folder with `pip install --no-index --find-links wheels`, so it
needs no network and never sees torch: only the `device` extra (numpy, onnxruntime) and
their dependencies are downloaded, as binary wheels for the target's platform and Python.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from edgetune.errors import UserError

# target name -> CPU architecture in manylinux platform tags
TARGETS: dict[str, str] = {"x86": "x86_64", "arm64": "aarch64"}
MIN_ONNXRUNTIME = (1, 17)  # older builds cannot load opset-18 graphs
_SOURCE_ITEMS = ("pyproject.toml", "README.md", "LICENSE", "edgetune")


def platform_tags(target: str) -> list[str]:
    """Every manylinux tag a glibc >= 2.28 Linux of `target` accepts, newest first.

    pip picks the newest wheel among the tags it is given; with `manylinux2014` alone it silently
    falls back to old releases (onnxruntime 1.16 for aarch64), so all the aliases are listed.
    """
    if target not in TARGETS:
        raise UserError(f"unknown target {target!r}: choose one of {', '.join(TARGETS)}")
    arch = TARGETS[target]
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(28, 16, -1)]
    tags.append(f"manylinux2014_{arch}")
    if arch == "x86_64":
        tags += [f"manylinux_2_{minor}_{arch}" for minor in (12, 5)]
        tags += [f"manylinux2010_{arch}", f"manylinux1_{arch}"]
    return tags


def source_root() -> Path:
    """The edgetune source tree the wheel is built from (the checkout this module runs from)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "pyproject.toml").is_file():
        raise UserError(f"no pyproject.toml in {root}: building the edgetune wheel needs a source checkout")
    return root


def device_requirements(root: str | os.PathLike | None = None) -> list[str]:
    """The `device` extra of pyproject.toml: the only packages the device installs besides edgetune."""
    path = Path(root or source_root()) / "pyproject.toml"
    with path.open("rb") as f:
        return list(tomllib.load(f)["project"]["optional-dependencies"]["device"])


def build_edgetune_wheel(dest: str | os.PathLike, work: str | os.PathLike) -> Path:
    """Build edgetune's wheel into `dest` from a copy of the source tree made under `work`.

    The copy keeps the build's `build/` and `*.egg-info` out of the checkout. `work` is removed.

    Returns:
        The path of the wheel.
    """
    root, dest, work = source_root(), Path(dest), Path(work)
    src = work / "src"
    src.mkdir(parents=True, exist_ok=True)
    for name in _SOURCE_ITEMS:
        item = root / name
        if item.is_dir():
            shutil.copytree(item, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif item.is_file():
            shutil.copy2(item, src / name)
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", os.fspath(dest), os.fspath(src)]
    if importlib.util.find_spec("setuptools") is not None:
        cmd.insert(4, "--no-build-isolation")  # no download of a build environment
    _run(cmd, "building the edgetune wheel")
    shutil.rmtree(work)
    wheels = sorted(dest.glob("edgetune-*.whl"))
    if not wheels:
        raise UserError(f"pip wheel wrote no edgetune wheel into {dest}")
    return wheels[-1]


def download_device_wheels(target: str, dest: str | os.PathLike, python_version: str = "3.11") -> list[Path]:
    """Download the device extra's wheels (and their dependencies) for `target` into `dest`.

    Uses pip's normal cache, so a second bundle for the same target costs no download.

    Returns:
        The wheels now in `dest`.
    """
    dest = Path(dest)
    abi = "cp" + python_version.replace(".", "")
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--dest", os.fspath(dest),
           "--only-binary=:all:", "--python-version", python_version,
           "--implementation", "cp", "--abi", abi]
    for tag in platform_tags(target):
        cmd += ["--platform", tag]
    _run(cmd + device_requirements(), f"downloading the device wheels for {target}")
    return sorted(dest.glob("*.whl"))


def copy_wheels(src: str | os.PathLike, dest: str | os.PathLike) -> list[Path]:
    """Copy a bundle made earlier (every wheel but edgetune's own) from `src` into `dest`."""
    src, dest = Path(src), Path(dest)
    found = [w for w in sorted(src.glob("*.whl")) if not w.name.startswith("edgetune-")]
    if not found:
        raise UserError(f"no wheels in {src}")
    return [Path(shutil.copy2(w, dest / w.name)) for w in found]


def check_onnxruntime(wheels: str | os.PathLike) -> str:
    """Fail clearly unless the bundle holds one onnxruntime wheel >= 1.17.

    Returns:
        The onnxruntime version in the bundle.
    """
    found = [m for w in Path(wheels).glob("onnxruntime-*.whl")
             if (m := re.match(r"onnxruntime-(\d+)\.(\d+)[^-]*-", w.name))]
    if not found:
        raise UserError(f"the bundle in {wheels} holds no onnxruntime wheel")
    version = max((int(m[1]), int(m[2])) for m in found)
    if version < MIN_ONNXRUNTIME:
        raise UserError(f"the bundle holds onnxruntime {version[0]}.{version[1]}, which cannot load opset-18 "
                        f"graphs; need >= {MIN_ONNXRUNTIME[0]}.{MIN_ONNXRUNTIME[1]} (check the platform tags)")
    return f"{version[0]}.{version[1]}"


def _run(cmd: list[str], what: str) -> None:
    """Run pip; on failure raise a UserError carrying pip's last error line."""
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [ln for ln in done.stderr.splitlines() if ln.strip() and not ln.startswith("WARNING")]
        raise UserError(f"{what} failed: {lines[-1] if lines else 'pip exit ' + str(done.returncode)}")
