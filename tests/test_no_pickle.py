"""No pickle anywhere in the project: loading a pickled file runs whatever code it names.

The check reads the syntax tree (not the text, so a docstring saying "why not pickle" is fine) of
every Python file under edgetune/, bench/, scripts/ and tests/, except this file, and flags:
importing pickle or its relatives, any name or keyword containing "pickle" (`allow_pickle=True`,
`pd.read_pickle`, ...), and `torch.load` (however imported) without `weights_only=True`. Shell
scripts are searched for `pickle` and `torch.load` as text.
"""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TREES = ("edgetune", "bench", "scripts", "tests")
PICKLING_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "pickletools"}


def _is_true(node: ast.expr) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def problems(source: str, filename: str = "<src>") -> list[str]:
    """Every pickle use in `source`, as `file:line: what` strings (empty if none).

    Args:
        source: Python source text.
        filename: used in the messages.
    """
    tree = ast.parse(source, filename)
    torch_names, load_names = {"torch"}, set()
    found: list[str] = []

    def flag(node: ast.AST, what: str) -> None:
        found.append(f"{filename}:{getattr(node, 'lineno', 0)}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PICKLING_MODULES:
                    flag(node, f"import {alias.name}")
                if alias.name == "torch" and alias.asname:
                    torch_names.add(alias.asname)
        elif isinstance(node, ast.ImportFrom):
            if (node.module or "").split(".")[0] in PICKLING_MODULES:
                flag(node, f"from {node.module} import ...")
            if node.module == "torch":
                load_names |= {a.asname or a.name for a in node.names if a.name == "load"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and "pickle" in node.id.lower():
            flag(node, f"name {node.id}")
        elif isinstance(node, ast.Attribute) and "pickle" in node.attr.lower():
            flag(node, f"attribute .{node.attr}")
        elif isinstance(node, ast.keyword) and node.arg and "pickle" in node.arg.lower():
            flag(node, f"keyword {node.arg}=")
        elif isinstance(node, ast.Call) and _is_torch_load(node.func, torch_names, load_names):
            if not any(k.arg == "weights_only" and _is_true(k.value) for k in node.keywords):
                flag(node, "torch.load without weights_only=True")
    return found


def _is_torch_load(func: ast.expr, torch_names: set[str], load_names: set[str]) -> bool:
    if isinstance(func, ast.Name):
        return func.id in load_names
    return (isinstance(func, ast.Attribute) and func.attr == "load" and isinstance(func.value, ast.Name)
            and func.value.id in torch_names)


def project_files(suffix: str) -> list[Path]:
    """Files with `suffix` under the checked trees, this test excluded.

    Hidden directories (virtual environments such as bench/.venv-ort, caches) and __pycache__ are
    not walked: they hold third-party code, not the project's.
    """
    files = []
    for tree in TREES:
        for directory, subdirs, names in os.walk(ROOT / tree):
            subdirs[:] = sorted(d for d in subdirs if not d.startswith(".") and d != "__pycache__")
            files += [Path(directory, n) for n in sorted(names) if n.endswith(suffix)]
    return [p for p in files if p.resolve() != Path(__file__).resolve()]


def test_project_has_no_pickle() -> None:
    files = project_files(".py")
    assert any(p.name == "format.py" for p in files)  # the walk really covers the package
    found = [msg for path in files for msg in problems(path.read_text("utf-8"), str(path.relative_to(ROOT)))]
    assert found == [], "\n".join(found)


def test_shell_scripts_have_no_pickle() -> None:
    found = [f"{path.relative_to(ROOT)}:{i}: {line.strip()}"
             for path in project_files(".sh")
             for i, line in enumerate(path.read_text("utf-8").splitlines(), 1)
             if re.search(r"pickle|torch\.load\((?![^)]*weights_only=True)", line)]
    assert found == [], "\n".join(found)


@pytest.mark.parametrize("source, count", [
    ("import pickle\npickle.loads(b'')", 2),  # the import and the name
    ("from pickle import loads", 1),
    ("import dill as d", 1),
    ("import numpy as np\nnp.load('x.npy', allow_pickle=True)", 1),
    ("import pandas as pd\npd.read_pickle('x')", 1),
    ("import torch\ntorch.load('w.pt')", 1),
    ("import torch as T\nT.load('w.pt', weights_only=False)", 1),
    ("from torch import load as L\nL('w.pt', map_location='cpu')", 1),
    ("import torch\ntorch.load('w.pt', weights_only=True, map_location='cpu')", 0),
    ("'''Why not pickle: it runs code.'''\n# pickle in a comment", 0),
    ("import numpy as np\nnp.load('x.npy')", 0),
])
def test_checker_flags_each_form(source: str, count: int) -> None:
    """The checker itself: each pickle form is caught, the safe forms are not."""
    assert len(problems(source)) == count, problems(source)
