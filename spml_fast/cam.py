"""Class activation maps (CAM) from image tags: the pseudo-label maps of docs/data.md
names for tag supervision ("CAMs thresholded at 0.2").

``spml-fast cam`` trains a multi-label classifier on the tags of a list
(the embedding network's backbone, a 1x1 convolution to one map per
foreground class, global average pooling, binary cross-entropy), then writes
for every image a label PNG: each pixel takes the tagged class whose CAM,
normalised by its maximum over the image, is highest, or background where
none reaches the threshold. The output list (``image cam/<name>.png``) is an
SPML list file like any other: train on it (relation C on the pseudo-labels,
O on the tags) and build the bank from it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import AugmentConfig, SegmentationDataset, collate, read_list
from .io import save_png, save_text
from .models import SmallBackbone


@dataclass(frozen=True)
class CamConfig:
    iterations: int = 400
    batch: int = 8
    lr: float = 0.01
    width: int = 32                  # small backbone width
    crop: int = AugmentConfig.crop   # the training crop's default
    threshold: float = 0.2           # background where no normalised CAM reaches this (docs/data.md, label maps)
    seed: int = 0


class CamNet(nn.Module):
    """images [B, 3, H, W] -> class maps [B, K-1, H/8, W/8] (foreground classes); logits = their mean."""

    def __init__(self, num_classes: int, width: int = 32):
        super().__init__()
        self.backbone = SmallBackbone(width)
        self.classifier = nn.Conv2d(self.backbone.out_channels, num_classes - 1, 1, bias=False)

    def forward(self, images):
        return self.classifier(self.backbone(images))


def tag_targets(tag_words: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[B, W] int64 bit sets -> [B, K-1] float multi-hot of the foreground classes 1..K-1."""
    classes = torch.arange(1, num_classes, device=tag_words.device)
    bits = (tag_words[:, classes // 64] >> (classes % 64)) & 1
    return bits.float()


def train_cam(dataset: SegmentationDataset, num_classes: int, config: CamConfig = CamConfig(),
              progress: bool = True) -> CamNet:
    from tqdm import tqdm
    torch.manual_seed(config.seed)
    model = CamNet(num_classes, config.width)
    optimiser = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9, weight_decay=5e-4)
    generator = torch.Generator().manual_seed(config.seed)
    bar = tqdm(range(config.iterations), desc="cam", disable=not progress)
    for iteration in bar:
        dataset.set_epoch(iteration)
        indices = torch.randint(0, len(dataset), (config.batch,), generator=generator).tolist()
        batch = collate([dataset[i] for i in indices])
        logits = model(batch["image"]).mean(dim=(2, 3))
        loss = F.binary_cross_entropy_with_logits(logits, tag_targets(batch["tags"], num_classes))
        for group in optimiser.param_groups:
            group["lr"] = config.lr * (1 - iteration / config.iterations) ** 0.9
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return model.eval()


@torch.no_grad()
def cam_labels(model: CamNet, image: torch.Tensor, tag_words: torch.Tensor, num_classes: int,
               threshold: float) -> np.ndarray:
    """image [3, H, W] normalised, tag_words [W] -> pseudo-label map [H, W] uint8 (0 = background)."""
    height, width = image.shape[-2:]
    maps = F.relu(model(image[None]))
    maps = F.interpolate(maps, size=(height, width), mode="bilinear", align_corners=False)[0]   # [K-1, H, W]
    tagged = tag_targets(tag_words[None], num_classes)[0].bool()
    maps = maps / maps.flatten(1).amax(1).clamp(min=1e-6)[:, None, None]                        # per class max 1
    maps[~tagged] = 0
    scores = torch.cat([torch.full((1, height, width), threshold), maps])                        # background first
    return scores.argmax(0).numpy().astype(np.uint8)


def write_cam_labels(root: str, list_file: str, out_list: str, num_classes: int,
                     config: CamConfig = CamConfig(), progress: bool = True) -> dict:
    """Train on ``list_file``'s tags, write ``ROOT/cam/<name>.png`` and ``ROOT/<out_list>``."""
    from tqdm import tqdm
    entries = read_list(root, list_file)
    augment = AugmentConfig(crop=config.crop)
    model = train_cam(SegmentationDataset(entries, num_classes, root, train=True, augment=augment), num_classes,
                      config, progress)
    plain = SegmentationDataset(entries, num_classes, root, train=False)
    lines = []
    os.makedirs(os.path.join(root, "cam"), exist_ok=True)
    for index in tqdm(range(len(plain)), desc="cam labels", disable=not progress, unit="image"):
        sample = plain[index]
        labels = cam_labels(model, sample["image"], sample["tags"], num_classes, config.threshold)
        name = os.path.splitext(os.path.basename(entries[index].image))[0] + ".png"
        save_png(os.path.join(root, "cam", name), labels)
        lines.append(f"{entries[index].key} cam/{name}")
    save_text(os.path.join(root, out_list), "\n".join(lines) + "\n")
    return dict(images=len(lines), list=os.path.join(root, out_list))
