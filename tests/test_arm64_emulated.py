"""arm64, verified rather than assumed: package-arm64/ runs under QEMU user-mode emulation and matches x86.

One package is built for arm64 with `prepare-and-run -t arm64 --no-run`; an x86 copy of it differs
only in the dependency wheels (same model, dataset, scripts and edgetune wheel). The arm64 bundle's
wheels are installed into an arm64 venv by emulated pip, and the package's own eval_untrained.sh,
train.sh (2 steps) and eval.sh run with EDGETUNE_PYTHON naming that venv's Python under qemu; the
x86 copy runs its scripts the default way (they make .venv themselves). Emulation costs ~150-200x,
so the data is 7 Fashion-MNIST images per class: by the split rule (index % 5: 0 validation, 1 test)
2 validation, 2 test and 3 train images per class, and the backbone runs over 50 images emulated
(validation and train; the test split is not reached in 2 steps). See tests/arm64_emulation.py for
what the emulation needs.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgetune.deploy import bundle
from tests import arm64_emulation as emu

SCRIPTS = ("eval_untrained.sh", "train.sh", "eval.sh")
PER_CLASS = 7
TRAIN_ARGS = "-c 2 --lr 0.01 --target-accuracy 1.01"
ACCURACY = re.compile(r"^accuracy on (\w+) data = (\S+)", re.M)
LOSS = re.compile(r"^(\d+): Loss is (\S+)", re.M)
EM_AARCH64 = 183  # ELF e_machine
# Seconds each emulated step may take before it is killed: generous for a loaded 2-core machine
# (quiet: ~2 s per image, ~40 s for pip), but a hang still ends.
PER_IMAGE, BASE = 30, 300


def test_edgetune_python_runs_instead_of_the_venv_and_installs_nothing(tmp_path: Path) -> None:
    """The hook the emulated run uses: the scripts exec $EDGETUNE_PYTHON with net_runner's arguments."""
    from edgetune.deploy import package

    stand_in = tmp_path / "bin" / "arm python"  # a space: the variable is quoted in the scripts
    stand_in.parent.mkdir()
    stand_in.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    stand_in.chmod(0o755)
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    for name, text in package.script_texts("model/m.tod", "3.9", ("-c", "2")).items():
        (pkg / name).write_text(text)
    done = subprocess.run(["sh", "train.sh"], cwd=pkg, capture_output=True, text=True, timeout=30,
                          env={**os.environ, "EDGETUNE_PYTHON": os.fspath(stand_in)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["-m", "edgetune.cli.net_runner", "-f", "model/m.tod", "-c", "2", "-d",
                                        "dataset", "--cache-dir", "cache", "--log", "train.jsonl"]
    assert not (pkg / ".venv").exists()  # no install, and no Python-version check of its own


def test_debian_sources_keep_the_hosts_debian_mirrors_only(tmp_path: Path, monkeypatch) -> None:
    """Both apt formats; third-party repositories (own suites or components) and disabled ones are left out."""
    monkeypatch.setattr(emu, "_host_codename", lambda: "trixie")
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text(
        "# comment\ndeb [signed-by=/k.gpg] http://mirror.example/debian trixie main contrib\n"
        "deb-src http://mirror.example/debian trixie main\n"
        "deb https://download.example/linux/debian trixie stable\n")
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\n# http://snapshot.debian.org/archive/debian/20250520T000000Z\n"
        "URIs: http://deb.debian.org/debian\nSuites: trixie trixie-updates\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        "Types: deb\nURIs: http://security.example/debian-security\nSuites: trixie-security\n"
        "Components: main\n\n"
        "Types: deb\nURIs: http://off.example/debian\nSuites: trixie\nComponents: main\nEnabled: no\n")
    (tmp_path / "sources.list.d" / "node.sources").write_text(
        "Types: deb\nURIs: https://deb.example\nSuites: nodistro\nComponents: main\n")
    (tmp_path / "sources.list.d" / "cloud.list.disabled").write_text("deb http://x.example trixie main\n")
    assert emu.debian_sources(tmp_path) == [
        "deb http://mirror.example/debian bookworm main",
        "deb http://deb.debian.org/debian bookworm main",
        "deb http://deb.debian.org/debian bookworm-updates main",
        "deb http://security.example/debian-security bookworm-security main",
    ]


def test_rootfs_is_built_once_and_an_interrupted_build_is_never_used(tmp_path: Path, monkeypatch) -> None:
    """mmdebstrap stood in for by a function: the build's folder appears only complete, by a rename."""
    calls = []

    def fake_mmdebstrap(cmd, **kwargs):
        target = Path(cmd[cmd.index("bookworm") + 1])
        calls.append(target)
        if len(calls) == 1:
            (target / "usr/bin").mkdir(parents=True)  # killed half-way: no pip wheel yet
            raise subprocess.TimeoutExpired(cmd, kwargs["timeout"])
        (target / "usr/bin").mkdir(parents=True)
        (target / "usr/bin/python3.11").write_bytes(b"\x7fELF")
        (target / "usr/share/python-wheels").mkdir(parents=True)
        (target / "usr/share/python-wheels/pip-23.0.1-py3-none-any.whl").write_bytes(b"PK")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(emu.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(emu.subprocess, "run", fake_mmdebstrap)
    with pytest.raises(subprocess.TimeoutExpired):
        emu.rootfs(tmp_path)
    assert os.listdir(tmp_path) == []  # nothing half-built is left to be reused
    stale = tmp_path / f".{calls[0].name.split('.partial-')[0][1:]}.partial-999999999"  # a dead build's leftover
    stale.mkdir()
    built = emu.rootfs(tmp_path)
    assert os.listdir(tmp_path) == [built.name]
    assert (built / "proc/cpuinfo").read_text().count("CPU part\t: 0xd0b") == (os.cpu_count() or 1)
    assert emu.rootfs(tmp_path) == built and len(calls) == 2  # reused, not rebuilt


@pytest.fixture(scope="session")
def arm64_emulator() -> emu.Emulator:
    """qemu user-mode emulation with a cached Debian arm64 userland (built on first use, ~80 MB)."""
    try:
        return emu.Emulator(emu.rootfs(), emu.qemu_binary())
    except emu.EmulationUnavailable as e:
        pytest.skip(f"{e} (scripts/setup.sh installs qemu-user and mmdebstrap)")


@pytest.fixture(scope="session")
def tiny_fashion_dir(mini_fashion_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first `PER_CLASS` images of each class of `mini_fashion_dir` (file-name order, as the split)."""
    out = tmp_path_factory.mktemp("tiny-fashion")
    shutil.copy(mini_fashion_dir / "classes.txt", out / "classes.txt")
    for line in (mini_fashion_dir / "classes.txt").read_text(encoding="utf-8").splitlines():
        folder = line.split("\t")[0]
        (out / folder).mkdir()
        for f in sorted((mini_fashion_dir / folder).iterdir())[:PER_CLASS]:
            shutil.copy(f, out / folder / f.name)
    return out


class Clock:
    """Wall and CPU seconds (of finished child processes) since creation: what the summary line reports.

    CPU time is the steadier number on a shared machine; wall time is what CI waits.
    """

    def __init__(self) -> None:
        self.wall, self.cpu = time.monotonic(), self._children_cpu()

    @staticmethod
    def _children_cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime

    def __str__(self) -> str:
        return f"{time.monotonic() - self.wall:.0f} s ({self._children_cpu() - self.cpu:.0f} s CPU)"


def run_scripts(package: Path, env: dict[str, str], images: dict[str, int]) -> dict[str, tuple[str, str]]:
    """Run the package's three scripts in order with `sh`; returns script -> (stdout, time taken)."""
    results = {}
    for script in SCRIPTS:
        clock = Clock()
        done = subprocess.run(["sh", script], cwd=package, env=env, capture_output=True, text=True,
                              timeout=BASE + PER_IMAGE * images[script], stdin=subprocess.DEVNULL)
        assert done.returncode == 0, f"{package.name}/{script}: {done.stderr[-3000:]}"
        results[script] = (done.stdout, str(clock))
    return results


def train_log(package: Path) -> list[dict]:
    return [json.loads(line) for line in (package / "train.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_arm64_package_runs_emulated_and_matches_x86(tmp_path: Path, arm64_emulator: emu.Emulator,
                                                     lite0_tod: Path, tiny_fashion_dir: Path,
                                                     x86_wheels: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    try:
        _check_against_x86(work, arm64_emulator, lite0_tod, tiny_fashion_dir, x86_wheels)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # ~300 MB of venvs and wheels


def _check_against_x86(work: Path, emulator: emu.Emulator, model: Path, data: Path, x86_wheels: Path) -> None:
    arm = work / "package-arm64"
    built = subprocess.run([sys.executable, "-m", "edgetune.cli.main", "prepare-and-run", "-t", "arm64", "--no-run",
                            "-D", os.fspath(data), "--model", os.fspath(model), "--train-args", TRAIN_ARGS,
                            "-o", os.fspath(arm)], capture_output=True, text=True, timeout=900)
    assert built.returncode == 0, built.stderr[-3000:]

    # the bundle: aarch64 builds only, onnxruntime new enough for opset 18
    wheels = sorted(p.name for p in (arm / "wheels").glob("*.whl"))
    assert all(w.endswith(("aarch64.whl", "-none-any.whl")) for w in wheels), wheels
    assert {w.split("-")[0].lower() for w in wheels} >= {"edgetune", "numpy", "onnxruntime"}
    ort = tuple(map(int, bundle.check_onnxruntime(arm / "wheels").split(".")))
    assert ort >= (1, 17)

    # the same package for x86: only the dependency wheels differ
    x86 = work / "package-x86"
    shutil.copytree(arm, x86, ignore=shutil.ignore_patterns("*.whl"))
    for w in [*(arm / "wheels").glob("edgetune-*.whl"), *x86_wheels.glob("*.whl")]:
        shutil.copy2(w, x86 / "wheels" / w.name)
    for dist in ("numpy", "onnxruntime"):  # both platforms get the same releases, so results may be compared
        found = {w.name.split("-")[1] for p in (arm, x86) for w in (p / "wheels").glob(f"{dist}-*.whl")}
        assert len(found) == 1, f"{dist}: the x86 and arm64 bundles hold different versions {sorted(found)}"

    # images each script runs through the backbone (split rule: index % 5 == 0 validation, 1 test);
    # train.sh's 2 steps of 32 cover the train split, eval.sh finds everything in cache/
    validation, test = len(range(0, PER_CLASS, 5)), len(range(1, PER_CLASS, 5))
    images = {"eval_untrained.sh": 10 * validation, "train.sh": 10 * (PER_CLASS - validation - test), "eval.sh": 0}

    # arm64: emulated venv from the bundle, then the package's own scripts, emulated
    clock = Clock()
    launcher = emulator.make_env(work / "arm64-env", arm / "wheels", "edgetune[device]", timeout=BASE * 2)
    install = str(clock)
    site = work / "arm64-env/lib/python3.11/site-packages"
    native = sorted(site.glob("onnxruntime/capi/onnxruntime_pybind11_state*.so"))
    assert native and emu.elf_machine(native[0]) == EM_AARCH64  # arm64 code is what ran
    for wheel in wheels:  # each of the bundle's wheels, at its version, and nothing from elsewhere
        name, version = wheel.split("-")[:2]
        assert (site / f"{name}-{version}.dist-info").is_dir(), wheel
    assert len(list(site.glob("*.dist-info"))) == len(wheels)
    arm_runs = run_scripts(arm, emu.clean_env(EDGETUNE_PYTHON=os.fspath(launcher)), images)
    assert not (arm / ".venv").exists()  # EDGETUNE_PYTHON: the scripts installed nothing

    # x86: the scripts' default path, a .venv of their own from wheels/
    x86_runs = run_scripts(x86, emu.clean_env(PYTHON=sys.executable), images)
    assert (x86 / ".venv/edgetune-installed").is_file()

    # every printed accuracy equal, every loss within 1e-4 relative, in the same order
    for script in SCRIPTS:
        arm_out, x86_out = arm_runs[script][0], x86_runs[script][0]
        assert ACCURACY.findall(arm_out) == ACCURACY.findall(x86_out), script
        assert ACCURACY.findall(arm_out), script
        arm_loss, x86_loss = LOSS.findall(arm_out), LOSS.findall(x86_out)
        assert [s for s, _ in arm_loss] == [s for s, _ in x86_loss]
        np.testing.assert_allclose([float(v) for _, v in arm_loss], [float(v) for _, v in x86_loss], rtol=1e-4)
    assert [s for s, _ in LOSS.findall(arm_runs["train.sh"][0])] == ["1", "2"]
    arm_log, x86_log = train_log(arm), train_log(x86)
    assert [r["event"] for r in arm_log] == [r["event"] for r in x86_log]
    steps = [(a["loss"], b["loss"]) for a, b in zip(arm_log, x86_log) if a["event"] == "step"]
    np.testing.assert_allclose(*zip(*steps), rtol=1e-4)

    # the .tod trained on arm64 loads here and its weights are x86's within 1e-5
    from edgetune.runtime import TrainSession

    name = model.stem + "_trained.tod"
    arm_model = TrainSession.create(arm / "model" / name)
    x86_model = TrainSession.create(x86 / "model" / name)
    assert arm_model.step == x86_model.step == 2
    arm_params, x86_params = arm_model.parameters(), x86_model.parameters()
    assert set(arm_params) == set(x86_params)
    for key, value in x86_params.items():
        np.testing.assert_allclose(arm_params[key], value, rtol=1e-5, atol=1e-5 * float(np.abs(value).max()),
                                   err_msg=key)

    # the numbers the README quotes (pytest -s shows them)
    timings = "; ".join(f"{s} {arm_runs[s][1]} [x86 {x86_runs[s][1]}]" for s in SCRIPTS)
    accuracies = [a for s in SCRIPTS for _, a in ACCURACY.findall(arm_runs[s][0])]
    worst = max(float(np.abs(arm_params[k] - v).max() / np.abs(v).max()) for k, v in x86_params.items())
    print(f"\narm64 emulated: venv + pip install {install}; {timings}\nwheels: {' '.join(wheels)}\n"
          f"validation accuracies (both): {accuracies}; losses arm64/x86: {steps}; "
          f"largest weight difference / tensor scale: {worst:.2g}")
