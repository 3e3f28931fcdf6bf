"""`TransferNet`: a frozen backbone followed by a small trainable head (the seed's network)."""

from __future__ import annotations

import torch
from torch import nn


class TransferNet(nn.Module):
    """`head(backbone(x))`. The split into backbone and head is what `export()` marks as frozen/trainable."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def default_head(in_features: int, num_classes: int, seed: int = 0, hidden: int | None = None,
                 dropout: float = 0.0) -> nn.Module:
    """The seed's head: `Dense(in, num_classes)`, weights ~ N(0, 0.1), bias 0, from a seeded generator.

    Args:
        in_features: the backbone's feature width.
        num_classes: outputs.
        seed: seeds the weight draw, so the same seed gives the same untrained model.
        hidden: if set, `Dense(in, hidden) -> ReLU [-> Dropout] -> Dense(hidden, num_classes)`.
        dropout: dropout probability before the last dense layer (only with `hidden`).

    Returns:
        An `nn.Linear` (parameter names `weight`, `bias`) or an `nn.Sequential` of the layers.
    """
    gen = torch.Generator().manual_seed(seed)

    def dense(n_in: int, n_out: int) -> nn.Linear:
        layer = nn.Linear(n_in, n_out)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(n_out, n_in, generator=gen) * 0.1)
            layer.bias.zero_()
        return layer

    if hidden is None:
        return dense(in_features, num_classes)
    layers: list[nn.Module] = [dense(in_features, hidden), nn.ReLU()]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    layers.append(dense(hidden, num_classes))
    return nn.Sequential(*layers)
