"""Segmentation head: BEV features on the coarse query grid -> per-class logits on the target grid.

``log2(factor)`` learned upsampling stages (2x2 stride-2 transposed conv + 3x3 conv, BN, ReLU),
channels halving from ``channels`` (min 16), then a 1x1 classifier.
"""

from __future__ import annotations

import torch
from torch import nn

Tensor = torch.Tensor


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class SegHead(nn.Module):
    def __init__(self, dim: int, num_classes: int, factor: int, channels: int) -> None:
        super().__init__()
        layers: list[nn.Module] = _conv_bn_relu(dim, channels)
        c = channels
        for _ in range(factor.bit_length() - 1):  # factor is a power of 2
            c_next = max(16, c // 2)
            layers += [nn.ConvTranspose2d(c, c_next, 2, stride=2, bias=False), nn.BatchNorm2d(c_next), nn.ReLU(inplace=True)]
            layers += _conv_bn_relu(c_next, c_next)
            c = c_next
        self.body = nn.Sequential(*layers)
        self.classifier = nn.Conv2d(c, num_classes, 1)

    def forward(self, bev: Tensor) -> Tensor:
        """``(B, D, Xq, Yq)`` -> ``(B, num_classes, Xq * factor, Yq * factor)``."""
        return self.classifier(self.body(bev))
