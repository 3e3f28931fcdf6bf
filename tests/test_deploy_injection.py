"""Deployment is injection-proof and stays in its folder.

Fake `ssh` and `adb` executables on PATH record their argv and run the remote command the way the
real tools do (ssh and `adb shell` join their arguments with spaces and hand the string to a
shell: here `bash -c`), so a wrongly quoted host, folder or package name would run the payload
`touch PWNED` for real. The package's scripts are run with hostile model names, and a package run
(the three scripts with the real net_runner on the tiny model) must write nothing outside the
package folder: not in HOME, not in TMPDIR, not next to its inputs.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from edgetune.deploy import package, transport
from edgetune.runtime import format as tod_format
from tests.fixtures_data import write_dataset
from tests.fixtures_runtime import tiny_model

PAYLOAD = "a b; touch PWNED1 'q\" $(touch PWNED2) `touch PWNED3` & touch PWNED4 #"

FAKE_SSH = """#!{python}
import json, os, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps(["ssh", *args]) + "\\n")
i = 0
while args[i] != "--" and args[i].startswith("-"):  # -o X, -F X, -p X: every option edgetune passes takes a value
    i += 2
i += args[i] == "--"  # ssh's end of options: what follows is the host, even if it starts with '-'
host, command = args[i], " ".join(args[i + 1:])  # what ssh sends: the words joined by spaces
sys.exit(subprocess.run(["bash", "-c", command], cwd=os.environ["FAKE_REMOTE_HOME"]).returncode)
"""

FAKE_ADB = """#!{python}
import json, os, shutil, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps(["adb", *args]) + "\\n")
if args[0] == "-s":
    args = args[2:]
if args[0] == "get-state":
    print("device")
elif args[0] == "shell":  # adb joins the words with spaces; the device's sh parses the string
    sys.exit(subprocess.run(["bash", "-c", " ".join(args[1:])], cwd=os.environ["FAKE_REMOTE_HOME"]).returncode)
elif args[0] == "push":  # no shell: the remote path travels in the adb protocol; `--` ends adb's options
    src, dest = [a for a in args[1:] if a != "--"]
    shutil.copytree(src, os.path.join(dest, os.path.basename(src.rstrip("/"))))
"""


@pytest.fixture
def fakes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """A bin/ with fake ssh and adb first on PATH, a remote home, and the argv log."""
    bin_dir, remote, log = tmp_path / "bin", tmp_path / "remote home", tmp_path / "argv.jsonl"
    bin_dir.mkdir()
    remote.mkdir()
    for name, text in (("ssh", FAKE_SSH), ("adb", FAKE_ADB)):
        (bin_dir / name).write_text(text.format(python=sys.executable))
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LOG", os.fspath(log))
    monkeypatch.setenv("FAKE_REMOTE_HOME", os.fspath(remote))
    monkeypatch.chdir(tmp_path)
    return {"root": tmp_path, "remote": remote, "log": log}


def _package(where: Path) -> Path:
    pkg = where / f"package-x86 {PAYLOAD}"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "sub" / "data.txt").write_text("payload\n")
    (pkg / "hello.sh").write_text('pwd > "$FAKE_LOG.pwd"; cat sub/data.txt; exit 3\n')
    return pkg


def _pwned(root: Path) -> list[str]:
    return sorted(os.fspath(p) for p in root.rglob("PWNED*")) + [p for p in ("/tmp/pwned", "/PWNED1")
                                                                   if os.path.exists(p)]


def _argv(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_ssh_hostile_host_folder_and_package_name(fakes: dict[str, Path], capfd: pytest.CaptureFixture) -> None:
    root, remote = fakes["root"], fakes["remote"]
    host = f"edgetune-test; touch {root}/PWNED_HOST"
    remote_dir = os.fspath(root / f"dest {PAYLOAD}")
    ssh = transport.Ssh(host, remote_dir)
    pkg = _package(root / "src")
    where = ssh.push(pkg)
    landed = Path(remote_dir) / pkg.name
    assert where == f"{host}:{landed}"
    assert (landed / "sub" / "data.txt").read_text() == "payload\n"
    capfd.readouterr()
    assert ssh.run("hello.sh") == 3
    assert capfd.readouterr().out == "payload\n"
    assert Path(f"{fakes['log']}.pwd").read_text().strip() == os.fspath(landed)
    for argv in _argv(fakes["log"]):
        assert argv[argv.index(host)] == host  # the host is one argv word, never parsed by a shell
    assert _pwned(root) == [] and _pwned(remote) == []


def test_adb_hostile_folder_serial_and_package_name(fakes: dict[str, Path], capfd: pytest.CaptureFixture) -> None:
    root = fakes["root"]
    remote_dir = os.fspath(root / f"device {PAYLOAD}")
    os.makedirs(remote_dir)
    adb = transport.Adb(remote_dir, serial=f"emulator-5554; touch {root}/PWNED_SERIAL")
    pkg = _package(root / "src")
    landed = Path(remote_dir) / pkg.name
    assert adb.push(pkg) == os.fspath(landed)
    assert (landed / "sub" / "data.txt").read_text() == "payload\n"
    capfd.readouterr()
    assert adb.run("hello.sh") == 3
    assert capfd.readouterr().out == "payload\n"
    assert Path(f"{fakes['log']}.pwd").read_text().strip() == os.fspath(landed)
    assert _pwned(root) == []


def test_ssh_refuses_an_option_as_host(fakes: dict[str, Path]) -> None:
    """`-oProxyCommand=...` as a host would make ssh run a local command: refused before ssh runs."""
    from edgetune.errors import UserError

    with pytest.raises(UserError, match="bad ssh host"):
        transport.Ssh(f"-oProxyCommand=touch {fakes['root']}/PWNED_PROXY")
    assert not fakes["log"].exists() and _pwned(fakes["root"]) == []


def stub_venv(package_dir: Path, body: str) -> None:
    """A `.venv` the scripts take as installed (package.py's first-run check), whose `python` and
    `net_runner` run `body` (a shell command line ending in `"$@"`)."""
    bin_dir = package_dir / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (package_dir / ".venv" / "edgetune-installed").touch()
    for name in ("python", "net_runner"):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)


def test_scripts_pass_a_hostile_model_name_as_one_word(tmp_path: Path) -> None:
    """The model path in train.sh/eval.sh reaches net_runner unchanged, its payload inert."""
    model = f"model/m {PAYLOAD}.tod"
    texts = package.script_texts(model, f"{sys.version_info[0]}.{sys.version_info[1]}")
    stub_venv(tmp_path, 'printf "%s\\n" "$@" > "$STUB_ARGV"')
    for name, text in texts.items():
        (tmp_path / name).write_text(text)
        argv_file = tmp_path / f"{name}.argv"
        done = subprocess.run(["sh", name], cwd=tmp_path, capture_output=True, text=True,
                              env={**os.environ, "STUB_ARGV": os.fspath(argv_file), "PYTHON": sys.executable})
        assert done.returncode == 0, done.stderr
        argv = argv_file.read_text().splitlines()
        want = model if name != "eval.sh" else model[:-len(".tod")] + "_trained.tod"
        assert argv[argv.index("-f") + 1] == want
    assert _pwned(tmp_path) == []


def _snapshot(root: Path, skip: Path) -> dict[str, tuple[int, float]]:
    """Every path under `root` except under `skip`: size and mtime (any write shows)."""
    out = {}
    for directory, dirs, files in os.walk(root):
        if Path(directory) == skip:
            dirs[:] = []
            continue
        for name in dirs + files:
            p = Path(directory, name)
            if p != skip:
                st = p.lstat()
                out[os.fspath(p)] = (st.st_size if stat.S_ISREG(st.st_mode) else 0, st.st_mtime)
    return out


@pytest.mark.slow
def test_package_run_writes_only_inside_the_package(tmp_path: Path) -> None:
    """Build a package (edgetune wheel + stub dependency wheels) and run its three scripts locally
    with the real net_runner on the tiny model, HOME and TMPDIR inside a watched folder: nothing may
    appear or change outside the package. (The first-run venv install is stubbed: `.venv/bin/python`
    is this interpreter.)"""
    world = tmp_path / "world"
    for d in ("home", "tmp", "work", "inputs", "wheels"):
        (world / d).mkdir(parents=True)
    model = tod_format.save_file(tiny_model(), world / "inputs" / "m.tod")
    data = write_dataset(world / "inputs" / "data")
    (world / "wheels" / "onnxruntime-1.20.0-cp311-cp311-manylinux_2_27_x86_64.whl").write_bytes(b"stub")
    env = {"HOME": os.fspath(world / "home"), "TMPDIR": os.fspath(world / "tmp"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}/usr/local/bin:/usr/bin:/bin",
           "PYTHON": sys.executable, "LANG": "C.UTF-8"}
    out = world / "work" / "package-x86"
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    pkg = package.build_package("x86", package.clean_package_dir(out), model, data, wheels_from=world / "wheels",
                                python_version=version, train_args=("-c", "60", "-s", "20", "--target-accuracy", "2"))
    stub_venv(out, f'exec {sys.executable} "$@"')  # .venv/bin/python -m edgetune.cli.net_runner ...
    before = _snapshot(world, out)
    for script in package.SCRIPTS:
        done = subprocess.run(["sh", os.fspath(out / script)], cwd=world / "work", env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, f"{script}: {done.stderr[-500:]}"
    after = _snapshot(world, out)
    changed = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))
    assert changed == [], f"written outside {pkg.root}: {changed}"
    assert (out / "model" / "m_trained.tod").is_file() and (out / "model" / "m_trained_20.tod").is_file()


# --- issue 16: `--` before every path, and the remote side checks what it replaces as the local side ---

GUARD_STATES = ("missing", "empty folder", "marker", "three scripts", "two scripts", "foreign files", "a file",
                "a link to a package", "a broken link", "marker, name starting with -")


def _make_state(where: Path, state: str) -> Path:
    path = where / ("-rf pkg" if state.endswith("with -") else "pkg")
    if state == "missing":
        return path
    if state in ("a link to a package", "a broken link"):
        target = where / "real"
        if state == "a link to a package":
            target.mkdir()
            (target / package.MARKER).touch()
        path.symlink_to(target)
        return path
    if state == "a file":
        path.write_text("precious")
        return path
    path.mkdir()
    names = {"marker": [package.MARKER], "three scripts": list(package.SCRIPTS), "two scripts": list(package.SCRIPTS[:2]),
             "foreign files": ["precious.txt"]}
    for name in names.get(state.split(",")[0], []):
        (path / name).write_text("x")
    return path


@pytest.mark.parametrize("state", GUARD_STATES)
def test_remote_guard_decides_exactly_as_clean_package_dir(state: str, tmp_path: Path) -> None:
    """The same folder states on both sides: the remote shell replaces what the local side would empty,
    refuses what it refuses, with the same message; a name starting with `-` is a name."""
    from edgetune.errors import UserError

    (tmp_path / "local").mkdir()
    (tmp_path / "remote").mkdir()
    local, remote = _make_state(tmp_path / "local", state), _make_state(tmp_path / "remote", state)
    try:
        package.clean_package_dir(local)
        local_verdict, local_message = "replaced", ""
    except UserError as e:
        local_verdict, local_message = "refused", str(e)
    done = subprocess.run(["sh", "-c", transport.replace_guard(remote.name)], cwd=remote.parent,
                          capture_output=True, text=True)
    remote_verdict = {0: "replaced", transport.REFUSED: "refused"}[done.returncode]
    assert remote_verdict == local_verdict
    if remote_verdict == "refused":
        assert done.stderr.strip() == local_message.replace(os.fspath(local), remote.name)
        assert os.path.lexists(remote)
    else:
        assert not os.path.lexists(remote)


@pytest.mark.parametrize("via", ["ssh", "adb"])
def test_push_never_replaces_a_foreign_remote_folder(via: str, fakes: dict[str, Path]) -> None:
    from edgetune.errors import UserError

    root, remote = fakes["root"], fakes["remote"]
    pkg = _package(root / "src")
    target_dir = remote / "dest"
    (target_dir / pkg.name).mkdir(parents=True)
    (target_dir / pkg.name / "precious.txt").write_text("keep")
    where = transport.Ssh("edgetune-test", os.fspath(target_dir)) if via == "ssh" else transport.Adb(os.fspath(target_dir))
    with pytest.raises(UserError, match="exists and is not a package folder: refusing to replace it"):
        where.push(pkg)
    assert (target_dir / pkg.name / "precious.txt").read_text() == "keep"
    assert sorted(os.listdir(target_dir / pkg.name)) == ["precious.txt"]


@pytest.mark.parametrize("via", ["ssh", "adb"])
def test_names_starting_with_a_dash_are_names(via: str, fakes: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """A package folder `-rf pkg` and a remote folder `--help dir`: tar, ssh and adb get `--` before each
    path (a fake tar logs its argv and runs the real one), and the package lands where it should."""
    import shutil

    root, remote = fakes["root"], fakes["remote"]
    real_tar = shutil.which("tar")
    (root / "bin" / "tar").write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> "$FAKE_LOG.tar"\nexec {real_tar} "$@"\n')
    (root / "bin" / "tar").chmod(0o755)
    pkg = root / "src" / "-rf pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "sub" / "data.txt").write_text("payload\n")
    (pkg / "hello.sh").write_text('pwd > "$FAKE_LOG.pwd"\n')
    monkeypatch.chdir(root / "src")
    target_dir = remote / "--help dir"
    target_dir.mkdir()
    where = transport.Ssh("edgetune-test", os.fspath(target_dir)) if via == "ssh" else transport.Adb(os.fspath(target_dir))
    where.push(Path("-rf pkg"))
    assert (target_dir / "-rf pkg" / "sub" / "data.txt").read_text() == "payload\n"
    assert where.run("hello.sh") == 0
    assert Path(f"{fakes['log']}.pwd").read_text().strip() == os.fspath(target_dir / "-rf pkg")
    argvs = _argv(fakes["log"])
    if via == "ssh":
        create = [line for line in Path(f"{fakes['log']}.tar").read_text().splitlines() if " -cf - " in line]
        assert len(create) == 1 and create[0].endswith(" -cf - -- -rf pkg")  # the local tar; the remote one reads stdin
        assert all(a[a.index("edgetune-test") - 1] == "--" for a in argvs)
    else:
        push = next(a for a in argvs if "push" in a)
        assert push[push.index("push") + 1] == "--"
    assert _pwned(root) == []
