"""Host side (onnx, no torch): an ONNX training graph or backbone to a `.tod` device model.

The names below load on first use, so `edgetune.convert.spec` (plain data: optimizer specs,
preprocessing presets) imports without onnx, e.g. while the CLI builds its parsers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"convert": "converter", "convert_backbone": "converter", "tod_path": "converter",
            "SGD": "spec", "Adam": "spec", "Int8": "spec", "quantize_tod": "converter"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'edgetune.convert' has no attribute {name!r}")
    return getattr(importlib.import_module(f"edgetune.convert.{_EXPORTS[name]}"), name)
