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


NO_ONNXRUNTIME = """
import sys

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "onnxruntime":
            raise ImportError(f"blocked import of {name}")
        return None

sys.meta_path.insert(0, Blocker())
from edgetune.cli.main import main

code = main(["prepare-data", "--images", sys.argv[1], "-o", sys.argv[2], "--resize-shorter", "40", "--crop", "32"])
from edgetune.runtime.dataset import load_dataset
data = load_dataset(sys.argv[2], {"resize_shorter": None, "crop": "center", "size": [32, 32], "layout": "NCHW",
                                  "channels": "RGB", "scale": 1.0, "mean": [0.0] * 3, "std": [1.0] * 3})
print(code, len(data.train), data.train.images([0]).shape, sorted(m for m in sys.modules if "onnxruntime" in m))
"""


def test_prepare_data_runs_where_onnxruntime_is_not_installed(tmp_path):
    """`edgetune prepare-data` and the dataset loader need numpy and Pillow only: importing the runtime
    package does not import onnxruntime (that waits for a frozen graph to load)."""
    from PIL import Image

    src = tmp_path / "photos"
    for c, colour in enumerate(((200, 30, 30), (30, 30, 200))):
        (src / f"class{c}").mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (48, 40 + i), colour).save(src / f"class{c}" / f"{i}.png")
    proc = subprocess.run([sys.executable, "-c", NO_ONNXRUNTIME, str(src), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[0] == "0 6 (1, 3, 32, 32) []"
    assert (tmp_path / "out" / "classes.txt").read_text(encoding="utf-8") == "0\tclass0\n1\tclass1\n"


def _imports(path: Path, module: str, known: set[str]) -> set[str]:
    """The edgetune modules `path` imports anywhere in it: at the top, in functions, under TYPE_CHECKING.

    `from a import b` counts as importing `a.b` when that is a module, else `a` (its __init__).
    Imports made from strings at run time (importlib) are not seen.
    """
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {name for name in found if name in known}


def _module_graph(root: Path = RUNTIME_DIR.parent) -> dict[str, set[str]]:
    """Module -> the modules of the same package tree it imports, for the package directory `root`."""
    files = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return {module: _imports(path, module, set(files)) - {module} for module, path in files.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as a path `[a, b, ..., a]`, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_import_graph_of_edgetune_has_no_cycle():
    graph = _module_graph()
    assert {"edgetune.runtime.trainer", "edgetune.runtime.callbacks", "edgetune.cli.net_runner"} <= set(graph)
    assert "edgetune.runtime.callbacks" in graph["edgetune.runtime.trainer"]
    assert "edgetune.runtime.session" in graph["edgetune.runtime.callbacks"]  # its TYPE_CHECKING import is seen
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_cycle_finder_sees_function_level_and_type_checking_imports(tmp_path):
    pkg = tmp_path / "edgetune"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from edgetune.sub.a import x\n")
    graph = _module_graph(pkg)
    assert graph["edgetune.sub.a"] == {"edgetune.sub.b"} and graph["edgetune.sub.b"] == {"edgetune.sub.a"}
    assert _cycle(graph) == ["edgetune.sub.a", "edgetune.sub.b", "edgetune.sub.a"]
