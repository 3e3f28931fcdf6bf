"""The device runtime never needs torch or onnx: proven in a process where importing them fails."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import edgetune.runtime

FORBIDDEN = ("torch", "onnx", "onnxscript", "torchvision")
RUNTIME_DIR = Path(edgetune.runtime.__file__).parent

BLOCKED_PROCESS = f"""
import importlib, pkgutil, sys

FORBIDDEN = {FORBIDDEN!r}

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in FORBIDDEN:
            raise ImportError(f"blocked import of {{name}}")
        return None

sys.meta_path.insert(0, Blocker())
try:
    import torch
except ImportError:
    pass
else:
    raise SystemExit("the blocker does not work")

import edgetune.runtime
names = [m.name for m in pkgutil.walk_packages(edgetune.runtime.__path__, "edgetune.runtime.")]
for name in names:
    importlib.import_module(name)
import edgetune.cli.main, edgetune.cli.net_runner
leaked = sorted(m for m in sys.modules if m.split(".")[0] in FORBIDDEN)
print(len(names), leaked)
"""


def test_runtime_imports_with_torch_and_onnx_blocked():
    proc = subprocess.run([sys.executable, "-c", BLOCKED_PROCESS], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    count, leaked = proc.stdout.split(" ", 1)
    expected = len(list(pkgutil.walk_packages(edgetune.runtime.__path__, "edgetune.runtime.")))
    assert int(count) == expected >= 1 and leaked.strip() == "[]"


def test_host_command_parsers_load_without_torch_or_onnx():
    """`edgetune export --help` and `convert --help` build their parsers with torch and onnx blocked."""
    body = BLOCKED_PROCESS.split("import edgetune.runtime\n")[0] + (
        "from edgetune.cli.main import parse_args\n"
        "for command in ('export', 'convert'):\n"
        "    try:\n"
        "        parse_args([command, '--help'])\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, e.code\n")
    proc = subprocess.run([sys.executable, "-c", body], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--backbone" in proc.stdout and "--backbone-onnx" in proc.stdout


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            roots.add(str(node.args[0].value).split(".")[0])
    return roots


def test_no_runtime_file_imports_torch_or_onnx():
    files = sorted(RUNTIME_DIR.rglob("*.py"))
    assert files
    offenders = {str(f.relative_to(RUNTIME_DIR)): sorted(_imported_roots(f) & set(FORBIDDEN)) for f in files}
    assert {f: roots for f, roots in offenders.items() if roots} == {}


def test_static_check_catches_a_lazy_import(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    import onnx.helper\n    return __import__('torch')\n")
    assert _imported_roots(sample) >= {"onnx", "torch"}
