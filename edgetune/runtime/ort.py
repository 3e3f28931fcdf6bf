"""The project's one import of onnxruntime, with its telemetry off.

onnxruntime's official builds send usage telemetry (1DS) unless `ORT_DISABLE_TELEMETRY` is set
before it initializes; a device training on private photos must not phone home, and neither should
`edgetune convert` on the host. Import `ort` from here, never onnxruntime directly
(setdefault: an explicit "0" from the user still wins).
"""

import os

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
import onnxruntime as ort  # noqa: E402 - must follow the environment setting above

__all__ = ["ort"]
