"""Predictors (docs/method.md, inference) on the tiled primitives: class scores of images from
their unit embeddings.

- ``pixel-knn``: each pixel votes with the labels of its k nearest bank
  prototypes (cosine); k = 1 is the nearest prototype's label (argmax).
- ``segment-knn``: SegSort at test time: spherical k-means of the image's
  embedding into segments, each segment prototype votes with its k nearest
  bank prototypes, and every pixel takes its segment's votes.
- ``classifier``: softmax of a linear head on the frozen embedding (the pce
  baseline's head, or one fit by ``spml-fast train-classifier``).

After any of them, optionally, dense CRF refinement (``crf``) against the
image's colours.

Around any of them: multi-scale (the image resized per scale, scores resized
back and averaged) and sliding windows (windows overlapping by a third;
a side shorter than the window is padded up to it with the mean colour,
i.e. 0 after normalisation, and the scores cropped; an image that fits in
one window is predicted whole).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .bank import PrototypeBank
from .config import DEFAULT_K                # a run's own k is TrainConfig.eval_k
from .crf import CrfConfig, refine_batch
from .data import denormalise
from .ops import nearest_prototype, segment_prototypes
from .segments import KMEANS_GRID, KMEANS_ITERATIONS, cluster_embeddings

METHODS = ("pixel-knn", "segment-knn", "classifier")


@dataclass(frozen=True)
class PredictorConfig:
    method: str = "pixel-knn"
    k: int = DEFAULT_K                 # neighbours voting (k-NN methods)
    window: Optional[int] = None       # sliding-window side in pixels; None = the whole image at once
    scales: tuple = (1.0,)             # multi-scale factors, scores averaged
    segment_grid: int = KMEANS_GRID    # segment-knn: k-means start grid per image (a run's: its bank's grid)
    segment_iterations: int = KMEANS_ITERATIONS
    crf: CrfConfig = CrfConfig()       # dense CRF on the final scores (off by default)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be a positive int, got {self.k!r}")
        if self.window is not None and self.window < 8:
            raise ValueError(f"window must be at least 8 pixels, got {self.window}")
        if not self.scales or any(s <= 0 for s in self.scales):
            raise ValueError(f"scales must be positive, got {self.scales}")


Head = Union[PrototypeBank, nn.Module]


def vote_scores(neighbour_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """neighbour_labels [P, k] int64 (-1 = no neighbour) -> vote shares [P, K] float32."""
    k = neighbour_labels.shape[1]
    votes = torch.zeros(neighbour_labels.shape[0], num_classes + 1, device=neighbour_labels.device)
    votes.scatter_add_(1, torch.where(neighbour_labels < 0, num_classes, neighbour_labels),
                       torch.ones_like(neighbour_labels, dtype=torch.float32))
    return votes[:, :num_classes] / k


def _knn_votes(queries: torch.Tensor, bank: PrototypeBank, k: int) -> torch.Tensor:
    """queries [P, D] unit -> [P, K] vote shares of their k nearest bank prototypes."""
    k = min(k, bank.prototypes.shape[0])
    neighbours, _ = nearest_prototype(queries, bank.prototypes.to(queries.dtype), k)
    labels = torch.where(neighbours < 0, -1, bank.labels[neighbours.clamp(min=0)])
    return vote_scores(labels, bank.num_classes)


def embedding_scores(embedding: torch.Tensor, head: Head, config: PredictorConfig) -> torch.Tensor:
    """embedding [B, D, h, w] float32 unit -> class scores [B, K, h, w] float32 (rows sum to 1)."""
    batch, dim, height, width = embedding.shape
    if config.method == "classifier":
        if isinstance(head, PrototypeBank):
            raise ValueError("method 'classifier' needs a classifier head, got a prototype bank")
        return head(embedding).float().softmax(1)
    if not isinstance(head, PrototypeBank):
        raise ValueError(f"method {config.method!r} needs a prototype bank")
    if head.dim != dim:
        raise ValueError(f"bank D = {head.dim} but the model's embeddings have D = {dim}")
    flat = embedding.permute(0, 2, 3, 1).reshape(-1, dim)
    if config.method == "pixel-knn":
        votes = _knn_votes(flat, head, config.k)                                     # [B*h*w, K]
    else:
        clusters, _ = cluster_embeddings(embedding, config.segment_grid, config.segment_iterations)
        count = int(clusters.max()) + 1
        votes = _knn_votes(segment_prototypes(flat, clusters, count), head, config.k)[clusters]
    return votes.reshape(batch, height, width, -1).permute(0, 3, 1, 2)


def _scores_at_size(model: nn.Module, images: torch.Tensor, head: Head, config: PredictorConfig) -> torch.Tensor:
    """images [B, 3, H, W] -> scores [B, K, H, W]: the whole image, bilinear back to its size."""
    scores = embedding_scores(model(images), head, config)
    return F.interpolate(scores, size=images.shape[-2:], mode="bilinear", align_corners=False)


def _window_starts(length: int, window: int) -> list[int]:
    if length <= window:
        return [0]
    stride = max(1, window * 2 // 3)
    return sorted({min(start, length - window) for start in range(0, length - window + stride, stride)})


def _sliding_scores(model, images, head, config: PredictorConfig) -> torch.Tensor:
    """Sum of window scores [B, K, H, W] (windows overlap by a third; every pixel covered)."""
    window = config.window
    height, width = images.shape[-2:]
    if not window or max(height, width) <= window:        # fits in one window: the whole image
        return _scores_at_size(model, images, head, config)
    padded = F.pad(images, (0, max(0, window - width), 0, max(0, window - height)))   # 0 = mean colour
    total = None
    for top in _window_starts(height, window):
        for left in _window_starts(width, window):
            crop = padded[:, :, top:top + window, left:left + window]
            scores = _scores_at_size(model, crop, head, config)
            if total is None:
                total = images.new_zeros(images.shape[0], scores.shape[1], padded.shape[2], padded.shape[3])
            total[:, :, top:top + window, left:left + window] += scores
    return total[:, :, :height, :width]


@torch.no_grad()
def predict_scores(model: nn.Module, images: torch.Tensor, head: Head,
                   config: PredictorConfig = PredictorConfig()) -> torch.Tensor:
    """images [B, 3, H, W] float, normalised (data.MEAN/STD) -> scores [B, K, H, W] float32,
    averaged over the scales (each sums over windows; argmax gives the labels)."""
    if images.dim() == 3:
        images = images[None]
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W] (or [3, H, W]), got {tuple(images.shape)}")
    height, width = images.shape[-2:]
    total = None
    for scale in config.scales:
        scaled = images if scale == 1.0 else F.interpolate(
            images, size=(max(8, round(height * scale)), max(8, round(width * scale))), mode="bilinear",
            align_corners=False)
        scores = _sliding_scores(model, scaled, head, config)
        if scale != 1.0:
            scores = F.interpolate(scores, size=(height, width), mode="bilinear", align_corners=False)
        total = scores if total is None else total + scores
    total = total / len(config.scales)
    if config.crf.enabled:
        total = refine_batch(total, to_uint8(images), config.crf)
    return total


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Normalised images [B, 3, H, W] -> uint8 [B, H, W, 3] (the colours the CRF compares)."""
    colours = (denormalise(images) * 255).round().to(torch.uint8)
    return colours.permute(0, 2, 3, 1).cpu().numpy()


def predict_labels(model: nn.Module, images: torch.Tensor, head: Head,
                   config: PredictorConfig = PredictorConfig()) -> torch.Tensor:
    """images [B, 3, H, W] normalised -> labels [B, H, W] int64."""
    return predict_scores(model, images, head, config).argmax(1)
