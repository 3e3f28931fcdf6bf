"""README's Python API example runs as written (on a tiny model and dataset), so it cannot rot."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from edgetune.runtime import TrainSession
from edgetune.runtime import format as tod_format
from tests.fixtures_runtime import TINY_SHAPE, tiny_model

README = Path(__file__).resolve().parents[1] / "README.md"


def python_api_block() -> str:
    """The first ```python block of README's "## Python API" section."""
    section = README.read_text(encoding="utf-8").split("## Python API", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README's Python API section has no python block"
    return match.group(1)


def test_readme_python_api_runs(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    tod_format.save_file(tiny_model(head="mlp", num_classes=3, batch_size=4), tmp_path / "model" /
                         "transfer_learning_tod.tod")
    rng = np.random.default_rng(0)
    lines = []
    for label in range(3):  # 10 images a class: 6 train, 2 test, 2 validation; the class sets the colour
        folder = tmp_path / "dataset" / str(label)
        folder.mkdir(parents=True)
        lines.append(f"{label}\tclass {label}\n")
        for i in range(10):
            pixels = np.clip(rng.normal(60 + 70 * label, 30, (*TINY_SHAPE[1:], 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, "RGB").save(folder / f"{i:02d}.bmp")
    (tmp_path / "dataset" / "classes.txt").write_text("".join(lines), encoding="utf-8")

    code = python_api_block()
    assert len(code.strip().splitlines()) <= 20
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = done.stdout.splitlines()
    assert [line.split(":")[0] for line in out[:3]] == ["20", "40", "60"]
    assert re.fullmatch(r"accuracy on validation data = [\d.]+", out[3]) and len(out) == 4
    trained = TrainSession.create(tmp_path / "model" / "transfer_learning_tod_trained.tod")
    assert trained.step == 60 and trained.record["steps"] == 60
