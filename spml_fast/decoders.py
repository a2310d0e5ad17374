"""Decoders of the embedding network (``models.EmbeddingNet``): encoder features -> D-channel maps at
stride 4, before the L2 normalisation.

- ``ASPPv2`` (DeepLab-v2, the paper's): parallel dilated 3x3 convolutions summed over the stride-8
  features, then x2 upsampling.
- ``DeepLabV3Plus``: ASPP (1x1 and three dilated 3x3 with BatchNorm, and image pooling) on the stride-16
  features, projected, upsampled x4 onto the stride-4 skip (projected to 48 channels), two 3x3
  convolutions and a 1x1 to D.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ASPPv2(nn.Module):
    """DeepLab-v2 atrous spatial pyramid pooling: parallel 3x3 convolutions, summed."""

    def __init__(self, in_channels: int, out_channels: int, rates=(6, 12, 18, 24)):
        super().__init__()
        self.branches = nn.ModuleList(nn.Conv2d(in_channels, out_channels, 3, padding=r, dilation=r)
                                      for r in rates)

    def forward(self, x):
        return sum(branch(x) for branch in self.branches)


def conv_bn_relu(cin: int, cout: int, kernel: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=(kernel - 1) // 2 * dilation, dilation=dilation,
                                   bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ASPPv3(nn.Module):
    """DeepLabV3's ASPP: 1x1, dilated 3x3 at ``rates``, and image pooling, concatenated and projected."""

    def __init__(self, in_channels: int, channels: int, rates=(6, 12, 18)):
        super().__init__()
        self.branches = nn.ModuleList([conv_bn_relu(in_channels, channels)] +
                                      [conv_bn_relu(in_channels, channels, 3, r) for r in rates])
        # image pooling: no BatchNorm (a 1x1 map has one value per channel and image)
        self.pooling = nn.Sequential(nn.Conv2d(in_channels, channels, 1), nn.ReLU(inplace=True))
        self.project = conv_bn_relu(channels * (len(rates) + 2), channels)

    def forward(self, x):
        pooled = self.pooling(x.mean((2, 3), keepdim=True))
        outputs = [branch(x) for branch in self.branches] + [pooled.expand(-1, -1, x.shape[2], x.shape[3])]
        return self.project(torch.cat(outputs, 1))


class DeepLabV3Plus(nn.Module):
    """(skip [B, Cs, H/4, W/4], deep [B, Cd, H/16, W/16]) -> [B, D, H/4, W/4] (not normalised)."""

    def __init__(self, skip_channels: int, deep_channels: int, out_channels: int, channels: int = 128,
                 rates=(6, 12, 18)):
        super().__init__()
        self.aspp = ASPPv3(deep_channels, channels, rates)
        self.skip = conv_bn_relu(skip_channels, 48)
        self.fuse = nn.Sequential(conv_bn_relu(channels + 48, channels, 3), conv_bn_relu(channels, channels, 3))
        self.head = nn.Conv2d(channels, out_channels, 1)

    def forward(self, features):
        skip, deep = features
        deep = F.interpolate(self.aspp(deep), size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(self.fuse(torch.cat([deep, self.skip(skip)], 1)))
