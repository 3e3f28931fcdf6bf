"""Deployment: the wheel bundle, the generated scripts, and copying/running over a real sshd."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from edgetune.cli.prepare_and_run import STAGES
from edgetune.deploy import bundle, package, transport
from edgetune.errors import UserError

# a folder name a remote shell would split, unquote or run as two commands if not quoted
AWKWARD = "remote dir; it's \"quoted\" $HOME"


def test_platform_tags_list_every_alias_newest_first() -> None:
    tags = bundle.platform_tags("arm64")
    assert tags[0] == "manylinux_2_28_aarch64"
    for tag in ("manylinux2014_aarch64", "manylinux_2_17_aarch64", "manylinux_2_27_aarch64"):
        assert tag in tags
    assert all(t.endswith("_aarch64") for t in tags)
    assert "manylinux2014_x86_64" in bundle.platform_tags("x86")
    with pytest.raises(UserError, match="x86, arm64"):
        bundle.platform_tags("riscv")


@pytest.mark.parametrize(("names", "expected"), [
    (["onnxruntime-1.17.0-cp311-cp311-manylinux_2_27_aarch64.whl"], "1.17"),
    (["onnxruntime-1.16.3-cp311-cp311-manylinux2014_aarch64.whl",
      "onnxruntime-1.20.1-cp311-cp311-manylinux_2_28_aarch64.whl"], "1.20"),
])
def test_check_onnxruntime_accepts_new_enough(tmp_path: Path, names: list[str], expected: str) -> None:
    for n in names:
        (tmp_path / n).touch()
    assert bundle.check_onnxruntime(tmp_path) == expected


@pytest.mark.parametrize("names", [[], ["onnxruntime-1.16.3-cp311-cp311-manylinux2014_aarch64.whl"]])
def test_check_onnxruntime_rejects_old_or_missing(tmp_path: Path, names: list[str]) -> None:
    for n in names:
        (tmp_path / n).touch()
    with pytest.raises(UserError, match="onnxruntime"):
        bundle.check_onnxruntime(tmp_path)


def test_device_requirements_have_no_torch() -> None:
    reqs = bundle.device_requirements()
    names = {re.split(r"[<>=!\[ ]", r)[0].lower() for r in reqs}
    assert names == {"numpy", "onnxruntime", "tqdm"}  # tqdm: pure Python progress bars


def test_edgetune_wheel_holds_the_runtime_and_leaves_the_checkout_alone(tmp_path: Path) -> None:
    root = bundle.source_root()
    before = sorted(p.name for p in root.iterdir())
    wheel = bundle.build_edgetune_wheel(tmp_path / "out", tmp_path / "work")
    assert sorted(p.name for p in root.iterdir()) == before  # no build/ or egg-info appeared
    assert not (tmp_path / "work").exists()
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = next(z.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    assert "edgetune/runtime/session.py" in names
    assert "edgetune/cli/net_runner.py" in names
    assert 'Requires-Dist: onnxruntime>=1.17; extra == "device"' in meta


def test_scripts_are_valid_sh_and_call_net_runner_like_the_seed(tmp_path: Path) -> None:
    texts = package.script_texts("model/m.tod", "3.11", ("-c", "5", "--lr", "0.01"))
    assert set(texts) == set(package.SCRIPTS)
    for name, text in texts.items():
        (tmp_path / name).write_text(text)
        assert subprocess.run(["sh", "-n", tmp_path / name]).returncode == 0, name
        assert "pip install -q --no-index --find-links wheels 'edgetune[device]'" in text
    run = 'exec "${EDGETUNE_PYTHON:-.venv/bin/python}" -m edgetune.cli.net_runner'
    last = {name: text.strip().splitlines()[-1] for name, text in texts.items()}
    assert last["eval_untrained.sh"] == f"{run} -f model/m.tod -c 0 -d dataset --cache-dir cache"
    assert last["train.sh"].startswith(f"{run} -f model/m.tod -c 5 --lr 0.01 -d dataset")
    assert last["eval.sh"] == f"{run} -f model/m_trained.tod -c 0 -d dataset --cache-dir cache"


def test_script_refuses_a_python_of_another_version(tmp_path: Path) -> None:
    (tmp_path / "eval.sh").write_text(package.script_texts("model/m.tod", "3.9")["eval.sh"])
    done = subprocess.run(["sh", "eval.sh"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 2
    assert "for Python 3.9" in done.stderr
    assert not (tmp_path / ".venv").exists()


def test_clean_package_dir_refuses_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep")
    with pytest.raises(UserError, match="not a package folder"):
        package.clean_package_dir(tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "keep"
    pkg = package.clean_package_dir(tmp_path / "package-x86")
    (pkg / ".work").mkdir()  # a build that failed half-way
    assert os.listdir(package.clean_package_dir(pkg)) == [package.MARKER]


def test_bad_python_version_is_a_user_error() -> None:
    with pytest.raises(UserError, match="major.minor"):
        package.script_texts("model/m.tod", "311")


def test_ssh_push_and_run_with_an_awkward_remote_folder(ssh_server, tmp_path: Path, capfd) -> None:
    pkg = tmp_path / "package-x86"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "sub" / "data.txt").write_text("payload\n")
    (pkg / ".venv").mkdir()  # a local venv is never copied
    (pkg / "hello.sh").write_text('echo "ran in $(pwd)"; cat sub/data.txt; exit 3\n')
    remote_root = tmp_path / AWKWARD
    ssh = transport.Ssh(ssh_server.host, os.fspath(remote_root), config=ssh_server.config)
    where = ssh.push(pkg)
    assert where == f"{ssh_server.host}:{remote_root / 'package-x86'}"
    assert (remote_root / "package-x86" / "sub" / "data.txt").read_text() == "payload\n"
    assert not (remote_root / "package-x86" / ".venv").exists()
    assert sorted(os.listdir(tmp_path)) == sorted(["package-x86", AWKWARD])  # nothing split off
    capfd.readouterr()
    assert ssh.run("hello.sh") == 3
    assert capfd.readouterr().out == f"ran in {remote_root / 'package-x86'}\npayload\n"


def test_ssh_unreachable_host_is_one_clear_error(ssh_server) -> None:
    with pytest.raises(UserError, match="cannot reach nohost.invalid over ssh"):
        transport.Ssh("nohost.invalid", config=ssh_server.config)
    with pytest.raises(UserError, match="bad ssh host"):
        transport.Ssh("-oProxyCommand=touch /tmp/x")


@pytest.mark.parametrize("argv", [
    ["-t", "arm64"],  # adb by default, and no adb / no device here
    ["--via", "ssh"],  # no --host
    ["--via", "ssh", "--host", "nohost.invalid", "--ssh-config", os.devnull],
    ["-t", "arm64", "--via", "local"],
])
def test_prepare_and_run_transport_errors_exit_2_before_building(tmp_path: Path, argv: list[str]) -> None:
    env = {**os.environ, "PATH": os.fspath(tmp_path)}  # no adb on this PATH, nor ssh
    if "nohost.invalid" in argv:
        env["PATH"] = os.environ["PATH"]
    done = subprocess.run([sys.executable, "-m", "edgetune.cli.main", "prepare-and-run", *argv],
                          cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgetune prepare-and-run: error: "), done.stderr
    assert os.listdir(tmp_path) == []  # nothing built


@pytest.mark.slow
def test_prepare_and_run_deploys_and_runs_over_real_ssh(ssh_server, tmp_path: Path, lite0_tod: Path,
                                                        mini_fashion_dir: Path, x86_wheels: Path) -> None:
    """The x86 package copied through sshd into an awkward folder; the three scripts run there."""
    local, remote = tmp_path / "local", tmp_path / AWKWARD
    local.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "edgetune.cli.main", "prepare-and-run", "-D", os.fspath(mini_fashion_dir),
         "--model", os.fspath(lite0_tod), "--wheels-from", os.fspath(x86_wheels), "--via", "ssh",
         "--host", ssh_server.host, "--ssh-config", os.fspath(ssh_server.config), "--remote-dir", os.fspath(remote),
         "--train-args", "-c 40 --lr 0.01 -s 20 --target-accuracy 1.01"],
        cwd=local, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout.splitlines()
    assert out[:3] == [f"package: {local / 'package-x86'}", "=======Pushing to device=======",
                       f"package on the device: {ssh_server.host}:{remote / 'package-x86'}"]
    assert [ln for ln in out if ln.startswith("==") and ln.endswith("=")][1:] == [h for _, h in STAGES]
    steps = [ln for ln in out if re.match(r"^\d+: Loss is ", ln)]
    assert [int(ln.split(":")[0]) for ln in steps] == list(range(1, 41))
    validation = [float(ln.rsplit("= ", 1)[1]) for ln in out if ln.startswith("accuracy on validation data = ")]
    assert len(validation) == 3 and validation[1] == validation[2]
    model = remote / "package-x86" / "model"
    stem = lite0_tod.stem
    assert sorted(os.listdir(model)) == sorted(f"{stem}{s}.tod" for s in ("", "_trained", "_trained_20", "_trained_40"))
    assert (remote / "package-x86" / ".venv" / "edgetune-installed").exists()
    assert os.listdir(local) == ["package-x86"] and not (local / "package-x86" / ".venv").exists()
    assert sorted(os.listdir(tmp_path)) == sorted(["local", AWKWARD])


def test_arm64_bundle_gets_an_onnxruntime_that_loads_opset_18(tmp_path: Path) -> None:
    """With every manylinux alias pip finds the newest aarch64 builds (manylinux2014 alone: 1.16)."""
    wheels = bundle.download_device_wheels("arm64", tmp_path)
    names = [w.name for w in wheels]
    assert all(n.endswith(("-none-any.whl", "aarch64.whl")) for n in names), names
    major, minor = map(int, bundle.check_onnxruntime(tmp_path).split("."))
    assert (major, minor) >= bundle.MIN_ONNXRUNTIME
    assert any(n.startswith("numpy-") and "cp311" in n for n in names)


def test_adb_commands_quote_the_remote_folder(tmp_path: Path, capfd, monkeypatch) -> None:
    """adb itself is not installed here: a stand-in `adb` runs `adb shell` strings with sh, as a device
    shell does, and `adb push` as a copy, so what is checked is the quoting of our commands."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "adb").write_text('#!/bin/sh\ncase "$1" in\n  get-state) echo device ;;\n'
                                 '  push) [ "$2" = -- ] && shift; cp -r -- "$2" "$3" ;;\n  shell) shift; exec sh -c "$*" ;;\nesac\n')
    (bin_dir / "adb").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    pkg = tmp_path / "package-arm64"
    pkg.mkdir()
    (pkg / "hello.sh").write_text('echo "ran in $(pwd)"\n')
    remote = tmp_path / AWKWARD
    adb = transport.Adb(os.fspath(remote))
    assert adb.push(pkg) == os.fspath(remote / "package-arm64")
    assert (remote / "package-arm64" / "hello.sh").is_file()
    capfd.readouterr()
    assert adb.run("hello.sh") == 0
    assert capfd.readouterr().out == f"ran in {remote / 'package-arm64'}\n"
    assert sorted(os.listdir(tmp_path)) == sorted(["bin", "package-arm64", AWKWARD])
