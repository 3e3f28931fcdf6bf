"""The device install stays under 160 MB: the `device` extra's packages and all they require, plus edgetune."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from edgetune.deploy.bundle import device_requirements

ROOT = Path(__file__).resolve().parents[1]
LIMIT_MB = 160


def test_device_extra_installs_under_160_mb() -> None:
    """Measured as bench/sizes.py does (the files each installed distribution's RECORD lists), on the
    versions installed here; edgetune's own files are added (its wheel holds the package only)."""
    names = [re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0] for requirement in device_requirements(ROOT)]
    assert "tqdm" in names  # the progress bars are part of the device install
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "sizes.py"), "--json", *names], capture_output=True, text=True,
                          check=True, timeout=120)
    sizes = json.loads(done.stdout)
    own = sum(p.stat().st_size for p in (ROOT / "edgetune").rglob("*.py")) / 1e6
    assert sizes["total"] + own <= LIMIT_MB, (sizes, own)
