"""edgetune: training on the device. Transfer learning with a frozen backbone and a small head.

Layers, one direction: `edgetune.host` (torch) -> `edgetune.convert` (onnx) -> `edgetune.runtime`
(numpy + onnxruntime). This top-level module imports none of them.
"""

__version__ = "0.1.0"
