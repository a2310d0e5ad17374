"""ImageNet encoders for DeepLabV3+ (``decoders.DeepLabV3Plus``), by name, with the parameter names of the
weights they load (``weights``): torchvision's MobileNetV2 (``features.N...``) and EfficientNet-Lite0
(``_conv_stem``, ``_blocks.N._expand_conv`` ...). Both run at output stride 16 (the last stride-2 stage
dilated instead) and give the stride-4 features the decoder's skip takes.

``forward(images [B, 3, H, W]) -> (skip [B, skip_channels, H/4, W/4], deep [B, out_channels, H/16, W/16])``.
The ImageNet classifier heads (MobileNetV2's ``features.18`` and ``classifier``, EfficientNet's
``_conv_head``, ``_bn1``, ``_fc``) are not built: ``IGNORED`` lists their key prefixes.
"""
from __future__ import annotations

import torch.nn as nn


def conv_bn_relu6(cin: int, cout: int, kernel: int = 3, stride: int = 1, dilation: int = 1, groups: int = 1,
                  eps: float = 1e-5) -> nn.Sequential:
    """Conv (no bias) + BatchNorm + ReLU6: keys ``0`` (conv) and ``1`` (bn), torchvision's ConvBNReLU."""
    padding = (kernel - 1) // 2 * dilation
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding, dilation=dilation, groups=groups, bias=False),
                         nn.BatchNorm2d(cout, eps=eps), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """MobileNetV2's block with torchvision's keys: ``conv.0`` expand (when t > 1), depthwise, linear
    projection and its BatchNorm."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int, dilation: int = 1):
        super().__init__()
        hidden = cin * expand
        layers = [conv_bn_relu6(cin, hidden, 1)] if expand != 1 else []
        layers += [conv_bn_relu6(hidden, hidden, 3, stride, dilation, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2Encoder(nn.Module):
    """torchvision's MobileNetV2 ``features.0-17`` at output stride 16 (blocks 14-17 dilated by 2)."""

    # (expansion t, channels c, repeats n, stride s) of the paper's Table 2
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1))
    SKIP_AFTER = 3                     # features.3 ends the stride-4 stage (24 channels)
    IGNORED = ("features.18.", "classifier.")

    def __init__(self):
        super().__init__()
        layers, cin, stride_so_far, dilation = [conv_bn_relu6(3, 32, 3, 2)], 32, 2, 1
        for expand, cout, repeats, stride in self.SETTINGS:
            for index in range(repeats):
                step = stride if index == 0 else 1
                if step == 2 and stride_so_far == 16:          # output stride 16: dilate instead
                    step, dilation = 1, 2
                stride_so_far *= step
                layers.append(InvertedResidual(cin, cout, step, expand, dilation))
                cin = cout
        self.features = nn.Sequential(*layers)
        self.skip_channels, self.out_channels = 24, 320

    def forward(self, images):
        x = images
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index == self.SKIP_AFTER:
                skip = x
        return skip, x


class LiteBlock(nn.Module):
    """EfficientNet-Lite's MBConv (no squeeze-excitation, ReLU6) with the keys of the Lite weights:
    ``_expand_conv``/``_bn0`` (when expanding), ``_depthwise_conv``/``_bn1``, ``_project_conv``/``_bn2``."""

    EPS = 1e-3                          # TensorFlow's BatchNorm epsilon, as trained

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, dilation: int = 1):
        super().__init__()
        hidden = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = nn.Conv2d(cin, hidden, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(hidden, eps=self.EPS)
        self._depthwise_conv = nn.Conv2d(hidden, hidden, kernel, stride, (kernel - 1) // 2 * dilation,
                                         dilation=dilation, groups=hidden, bias=False)
        self._bn1 = nn.BatchNorm2d(hidden, eps=self.EPS)
        self._project_conv = nn.Conv2d(hidden, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=self.EPS)
        self.residual = stride == 1 and cin == cout
        self.act = nn.ReLU6(inplace=True)

    def forward(self, x):
        out = self.act(self._bn0(self._expand_conv(x))) if self.expand else x
        out = self._bn2(self._project_conv(self.act(self._bn1(self._depthwise_conv(out)))))
        return x + out if self.residual else out


class EfficientNetLite0Encoder(nn.Module):
    """EfficientNet-Lite0 (stem, 16 blocks) at output stride 16 (the stride-32 stage dilated by 2)."""

    # (expansion, kernel, stride, channels, repeats) per stage: EfficientNet-B0's, unscaled
    STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
              (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))
    SKIP_AFTER = 2                     # _blocks.2 ends the stride-4 stage (24 channels)
    IGNORED = ("_conv_head.", "_bn1.", "_fc.")

    def __init__(self):
        super().__init__()
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, 1, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=LiteBlock.EPS)
        self.act = nn.ReLU6(inplace=True)
        blocks, cin, stride_so_far, dilation = [], 32, 2, 1
        for expand, kernel, stride, cout, repeats in self.STAGES:
            for index in range(repeats):
                step = stride if index == 0 else 1
                if step == 2 and stride_so_far == 16:
                    step, dilation = 1, 2
                stride_so_far *= step
                blocks.append(LiteBlock(cin, cout, kernel, step, expand, dilation))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self.skip_channels, self.out_channels = 24, 320

    def forward(self, images):
        x = self.act(self._bn0(self._conv_stem(images)))
        for index, block in enumerate(self._blocks):
            x = block(x)
            if index == self.SKIP_AFTER:
                skip = x
        return skip, x
