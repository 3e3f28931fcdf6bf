"""Host side (onnx, no torch): an ONNX training graph or backbone to a `.tod` device model."""

from edgetune.convert.convert import convert, convert_backbone, tod_path
from edgetune.convert.spec import SGD, Adam

__all__ = ["SGD", "Adam", "convert", "convert_backbone", "tod_path"]
