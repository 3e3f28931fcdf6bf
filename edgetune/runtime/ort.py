"""The project's one import of onnxruntime: on first use, with its telemetry off.

onnxruntime's official builds send usage telemetry (1DS) unless `ORT_DISABLE_TELEMETRY` is set
before it initializes; a device training on private photos must not phone home, and neither should
`edgetune convert` on the host. Get the module from `onnxruntime()`, never import it directly
(setdefault: an explicit "0" from the user still wins).

It is imported when a frozen graph is first loaded, not with `edgetune.runtime`: the image modules
and `edgetune prepare-data` run where onnxruntime is not installed.
"""

from __future__ import annotations

import os
from types import ModuleType


def onnxruntime() -> ModuleType:
    """The `onnxruntime` module, imported (once, by Python's module cache) with telemetry off."""
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    import onnxruntime as ort

    return ort
