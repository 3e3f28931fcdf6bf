"""Host side (torch): backbones, the TransferNet, optimizer specs and `export()` to an ONNX training graph."""

from edgetune.convert.spec import SGD, Adam
from edgetune.host.backbones import BACKBONES, BackboneInfo, create_backbone, register_backbone
from edgetune.host.export import export
from edgetune.host.net import TransferNet, default_head

__all__ = ["BACKBONES", "SGD", "Adam", "BackboneInfo", "TransferNet", "create_backbone", "default_head", "export",
           "register_backbone"]
