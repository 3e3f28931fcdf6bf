"""A network in miniature for tests of a trainable sub-graph (its export, a federated round): seconds, not minutes."""

from __future__ import annotations

import torch
from torch import nn


class TinyBackbone(nn.Module):
    """An EfficientNet in miniature: TF-"same" padded stride-2 depthwise conv, BN, ReLU6, a residual, view(bs, -1)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU6())
        self.dw = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(4, 4, 3, stride=2, groups=4, bias=False),
                                nn.BatchNorm2d(4), nn.ReLU6())
        self.pw = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bs = x.size(0)
        x = self.dw(self.stem(x))
        x = self.pw(x) + x
        return self.fc(self.pool(x).view(bs, -1))
