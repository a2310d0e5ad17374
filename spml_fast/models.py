"""The embedding network (docs/method.md, embedding network): an encoder by name and a decoder apart,
then L2 normalisation over channels, at stride 4. The paper's: a dilated ResNet with output stride 8
and the DeepLab-v2 ASPP head (rates 6/12/18/24), x2 upsampling; a small backbone fit for CPU training
with the same head; and ImageNet encoders (MobileNetV2, EfficientNet-Lite0: ``encoders``) with
DeepLabV3+ (``decoders``).

The ResNet is written here with torchvision's parameter names
(``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0`` ...), so a
torchvision or SPML ImageNet state dict loads by name. torchvision itself is
not a dependency: its PyPI wheels pin a torch build that is not the CPU
build this project installs, and it would be used for two class definitions.
Nothing is downloaded: ``load_pretrained`` reads a local file.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .decoders import ASPPv2, DeepLabV3Plus
from .encoders import EfficientNetLite0Encoder, MobileNetV2Encoder


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1, dilation: int = 1,
                 downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class DilatedResNet(nn.Module):
    """ResNet-50/101 with layer3 and layer4 dilated (2, 4) instead of strided: output stride 8."""

    BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}

    def __init__(self, depth: int = 101):
        super().__init__()
        if depth not in self.BLOCKS:
            raise ValueError(f"depth must be one of {sorted(self.BLOCKS)}, got {depth}")
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.in_channels = 64
        blocks = self.BLOCKS[depth]
        self.layer1 = self._layer(64, blocks[0], stride=1, dilation=1)
        self.layer2 = self._layer(128, blocks[1], stride=2, dilation=1)
        self.layer3 = self._layer(256, blocks[2], stride=1, dilation=2)
        self.layer4 = self._layer(512, blocks[3], stride=1, dilation=4)
        self.out_channels = 2048

    def _layer(self, width: int, count: int, stride: int, dilation: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.in_channels != width * Bottleneck.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.in_channels, width * 4, 1, stride, bias=False),
                                       nn.BatchNorm2d(width * 4))
        layers = [Bottleneck(self.in_channels, width, stride, max(1, dilation // 2) if dilation > 1 else 1,
                             downsample)]
        self.in_channels = width * Bottleneck.expansion
        layers += [Bottleneck(self.in_channels, width, 1, dilation) for _ in range(count - 1)]
        return nn.Sequential(*layers)

    def forward(self, images):
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class SmallBackbone(nn.Module):
    """A 6-conv network with output stride 8 for CPU training of the built-in data."""

    def __init__(self, width: int = 32):
        super().__init__()

        def block(cin, cout, stride, dilation=1):
            return [nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False),
                    nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*block(3, width, 2), *block(width, width, 1), *block(width, 2 * width, 2),
                                      *block(2 * width, 2 * width, 1), *block(2 * width, 4 * width, 2),
                                      *block(4 * width, 4 * width, 1, dilation=2))
        self.out_channels = 4 * width

    def forward(self, images):
        return self.features(images)


OUTPUT_STRIDE = 4                # every network's embedding: [B, D, ceil(H / 4), ceil(W / 4)]


def output_size(height: int, width: int) -> tuple[int, int]:
    """The embedding's (h, w) for an image of height x width."""
    return -(-height // OUTPUT_STRIDE), -(-width // OUTPUT_STRIDE)


ENCODERS = ("small", "resnet50", "resnet101", "mobilenet_v2", "efficientnet_lite0")
DECODERS = ("aspp", "deeplabv3+")
IMAGENET_ENCODERS = {"mobilenet_v2": MobileNetV2Encoder, "efficientnet_lite0": EfficientNetLite0Encoder}


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "small"          # the encoder (ENCODERS)
    decoder: str = "aspp"            # "aspp": DeepLab-v2 (small, ResNets); "deeplabv3+": stride-4 skip (ImageNet encoders)
    embedding_dim: int = 64          # D
    width: int = 32                  # small backbone width
    aspp_rates: tuple = (6, 12, 18, 24)
    decoder_channels: int = 128      # deeplabv3+: ASPP and fusion width
    freeze_backbone_bn: bool = False  # keep the encoder's BatchNorm statistics (a pretrained encoder, small batches)

    def __post_init__(self):
        if self.backbone not in ENCODERS:
            raise ValueError(f"model.backbone must be one of {', '.join(ENCODERS)}, got {self.backbone!r}")
        if self.decoder not in DECODERS:
            raise ValueError(f"model.decoder must be one of {', '.join(DECODERS)}, got {self.decoder!r}")
        if (self.decoder == "deeplabv3+") != (self.backbone in IMAGENET_ENCODERS):
            raise ValueError(f"model.decoder {self.decoder!r} does not fit model.backbone {self.backbone!r}: "
                             f"deeplabv3+ goes with {', '.join(IMAGENET_ENCODERS)}, aspp with small and the ResNets")
        if self.embedding_dim < 2:
            raise ValueError(f"model.embedding_dim must be >= 2, got {self.embedding_dim}")


class EmbeddingNet(nn.Module):
    """images [B, 3, H, W] float -> unit embeddings [B, D, ceil(H/4), ceil(W/4)] float32.

    An encoder by name (``backbone``) and a decoder apart (``decoder``/``aspp``), as
    segmentation_models_pytorch composes them."""

    def __init__(self, config: ModelConfig = ModelConfig()):
        super().__init__()
        self.config = config
        if config.backbone in IMAGENET_ENCODERS:
            self.backbone = IMAGENET_ENCODERS[config.backbone]()
            self.decoder = DeepLabV3Plus(self.backbone.skip_channels, self.backbone.out_channels,
                                         config.embedding_dim, config.decoder_channels)
        else:
            if config.backbone == "small":
                self.backbone = SmallBackbone(config.width)
                rates = tuple(max(1, r // 6) for r in config.aspp_rates)   # 1/2/3/4: the small maps are small
            else:
                self.backbone = DilatedResNet(int(config.backbone[6:]))
                rates = config.aspp_rates
            self.aspp = ASPPv2(self.backbone.out_channels, config.embedding_dim, rates)
        self.checkpoint_backbone = False

    def train(self, mode: bool = True):
        """With ``freeze_backbone_bn`` the encoder's BatchNorm layers stay in eval mode: they normalise with
        the statistics they were pretrained with (a batch of 8 crops estimates them poorly); their affine
        parameters still train."""
        super().train(mode)
        if mode and self.config.freeze_backbone_bn:
            for module in self.backbone.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.checkpoint_backbone and self.training:
            from torch.utils.checkpoint import checkpoint
            features = checkpoint(self.backbone, images, use_reentrant=False)
        else:
            features = self.backbone(images)
        if self.config.decoder == "deeplabv3+":
            embedding = self.decoder(features)
        else:
            embedding = F.interpolate(self.aspp(features), scale_factor=2, mode="bilinear", align_corners=False)
        return F.normalize(embedding.float(), dim=1)


PREFIXES = ("module.", "backbone.", "resnet.", "encoder.")


def load_pretrained(model: EmbeddingNet, path: str) -> dict:
    """Load a local ImageNet state dict into the encoder: torchvision's names for the ResNets and
    MobileNetV2, the Lite weights' names for EfficientNet-Lite0, optionally prefixed by ``module.``,
    ``backbone.``, ``resnet.`` or ``encoder.``; the ImageNet classifier's keys are dropped. ``path``: a
    file, or a weights NAME fetched into the cache (``weights``). Returns {"missing": [...],
    "unexpected": [...], "loaded": count}; loading nothing is an error (another network's weights)."""
    from .weights import resolve
    path = resolve(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # missing file, not a zip/pickle, unsafe content: all "cannot read"
        raise ValueError(f"--pretrained {path}: cannot read a state dict ({type(error).__name__}: {error})") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"--pretrained {path}: not a state dict")
    ignored = ("fc.",) + getattr(type(model.backbone), "IGNORED", ())
    cleaned = {}
    for key, value in state.items():
        for prefix in PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        if not key.startswith(ignored):
            cleaned[key] = value
    expected = model.backbone.state_dict()
    shaped = {k: v for k, v in cleaned.items() if k in expected and tuple(v.shape) == tuple(expected[k].shape)}
    if not shaped:
        raise ValueError(f"--pretrained {path}: none of its {len(cleaned)} tensors fits the {model.config.backbone} "
                         "encoder (weights of another network?)")
    result = model.backbone.load_state_dict(shaped, strict=False)
    unexpected = sorted(set(cleaned) - set(shaped))
    return {"missing": list(result.missing_keys), "unexpected": unexpected, "loaded": len(shaped)}


class LinearClassifier(nn.Module):
    """1x1 convolution from unit embeddings [B, D, h, w] to K class logits [B, K, h, w].

    ``scale`` > 0 makes it a cosine classifier: logits = scale x cos(embedding, class weight), no bias.
    On unit embeddings a plain linear head reaches confident logits only once its weights have grown,
    which SGD with weight decay does slowly; the cosine head has the logit range of a concentration
    (like SPML's kappa) from the first step. ``folded()`` gives the plain linear head with the same
    logits, which is what is saved and exported."""

    def __init__(self, embedding_dim: int, num_classes: int, scale: float = 0.0):
        super().__init__()
        self.scale = float(scale)
        self.classifier = nn.Conv2d(embedding_dim, num_classes, 1, bias=self.scale <= 0)

    def forward(self, embeddings):
        if self.scale > 0:
            return F.conv2d(embeddings, self.scale * F.normalize(self.classifier.weight, dim=1))
        return self.classifier(embeddings)

    def folded(self) -> "LinearClassifier":
        """The plain linear head (weight [K, D, 1, 1], bias [K]) computing the same logits."""
        if self.scale <= 0:
            return self
        weight = self.classifier.weight.detach()
        plain = LinearClassifier(weight.shape[1], weight.shape[0]).to(weight.device)
        with torch.no_grad():
            plain.classifier.weight.copy_(self.scale * F.normalize(weight, dim=1))
            plain.classifier.bias.zero_()
        return plain.eval()
