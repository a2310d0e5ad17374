"""SegSort segments of a batch (docs/method.md, segments) and their attributes.

Per image: spherical k-means on [embedding, y, x] from a regular grid, then
the clusters are split so that a segment never mixes labels or
over-segmentation regions: segment = unique (image, cluster, label, region)
among the non-padding pixels. Prototypes are normalised means of the member
embeddings, with gradient; the assignment is not differentiated.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .ops import grid_assignment, segment_prototypes, spherical_kmeans
from .data import IGNORE
from .ops.membership import row_ids

KMEANS_GRID = 6            # SegSort: k-means start grid per image (the one default; TrainConfig.kmeans_grid)
KMEANS_ITERATIONS = 10


@dataclass
class Segments:
    """Pixels (non-padding, at embedding resolution) and segments of one batch."""

    embeddings: torch.Tensor       # [N, D] float32, with gradient
    segment: torch.Tensor          # [N] int64 in [0, M)
    prototypes: torch.Tensor       # [M, D] float32, with gradient
    pixel_label: torch.Tensor      # [N] int64, -1 = unlabelled
    pixel_image: torch.Tensor      # [N] int64 image index in the batch
    pixel_region: torch.Tensor     # [N] int64 over-segmentation region, unique across the batch
    pixel_tags: torch.Tensor       # [N, W] int64 image tag bit sets
    segment_label: torch.Tensor    # [M]
    segment_image: torch.Tensor    # [M]
    segment_region: torch.Tensor   # [M]
    segment_tags: torch.Tensor     # [M, W]


def pool_labels(label: torch.Tensor, size: tuple[int, int], num_classes: int) -> torch.Tensor:
    """[B, H, W] labels (255 = unlabelled) -> [B, h, w]: the most frequent label among the labelled
    pixels of each cell, 255 where a cell has none. Keeps thin scribbles that nearest sampling drops."""
    classes = torch.arange(num_classes, device=label.device)[None, :, None, None]
    one_hot = label[:, None] == classes                                      # no range check: no sync
    counts = F.adaptive_avg_pool2d(one_hot.float(), size)
    best = counts.argmax(1)
    return torch.where(counts.sum(1) > 0, best, torch.full_like(best, IGNORE))


def sample_nearest(values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B, H, W] -> [B, h, w] by the value at each cell's centre."""
    height, width = values.shape[-2:]
    rows = ((torch.arange(size[0], device=values.device) + 0.5) * height / size[0]).long().clamp_(max=height - 1)
    cols = ((torch.arange(size[1], device=values.device) + 0.5) * width / size[1]).long().clamp_(max=width - 1)
    return values[:, rows][:, :, cols]


def location_features(embeddings: torch.Tensor) -> torch.Tensor:
    """[B, D, h, w] -> [B*h*w, D + 2]: embedding and (y, x) in [-0.5, 0.5], L2-normalised."""
    batch, _, height, width = embeddings.shape
    ys = (torch.arange(height, device=embeddings.device, dtype=torch.float32) + 0.5) / height - 0.5
    xs = (torch.arange(width, device=embeddings.device, dtype=torch.float32) + 0.5) / width - 0.5
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij"))[None].expand(batch, -1, -1, -1)
    features = torch.cat([embeddings.detach().float(), grid], dim=1)
    return F.normalize(features.permute(0, 2, 3, 1).reshape(batch * height * width, -1), dim=1)


def cluster_embeddings(embeddings: torch.Tensor, grid: int, iterations: int,
                       pixels: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SegSort clusters of embeddings [B, D, h, w]: spherical k-means on [embedding, y, x] from a
    grid x grid start per image, over the flat pixel indices ``pixels`` (default: all B*h*w).
    Returns (cluster [P] int64, ids unique across the batch; image [P] int64)."""
    batch, _, height, width = embeddings.shape
    init, image = grid_assignment(batch, height, width, min(grid, height), min(grid, width), embeddings.device)
    features = location_features(embeddings)
    if pixels is not None:
        features, init, image = features[pixels], init[pixels], image[pixels]
    clusters, _ = spherical_kmeans(features, init, iterations, image)
    return clusters, image


def make_segments(embeddings: torch.Tensor, label: torch.Tensor, overseg: torch.Tensor, valid: torch.Tensor,
                  tags: torch.Tensor, num_classes: int, grid: int = KMEANS_GRID,
                  iterations: int = KMEANS_ITERATIONS) -> Segments:
    """embeddings [B, D, h, w] unit; label [B, H, W] (255 unlabelled); overseg [B, H, W] (-1 padding);
    valid [B, H, W] bool; tags [B, W] int64 bit sets."""
    dim, height, width = embeddings.shape[1:]
    size = (height, width)
    small_label = pool_labels(label, size, num_classes).reshape(-1)
    small_region = sample_nearest(overseg, size).reshape(-1)
    small_valid = (sample_nearest(valid.long(), size).reshape(-1) > 0) & (small_region >= 0)
    pixels = small_valid.nonzero()[:, 0]
    clusters, image = cluster_embeddings(embeddings, grid, iterations, pixels)
    region = small_region[pixels]
    region = row_ids(torch.stack([image, region], 1))                    # unique across the batch
    pixel_label = small_label[pixels]
    pixel_label = torch.where(pixel_label == IGNORE, -1, pixel_label)
    segment = row_ids(torch.stack([clusters, pixel_label, region], 1))
    num_segments = int(segment.max()) + 1
    flat = embeddings.permute(0, 2, 3, 1).reshape(-1, dim)[pixels]
    prototypes = segment_prototypes(flat, segment, num_segments)
    first = torch.full((num_segments,), pixels.shape[0], dtype=torch.int64, device=segment.device)
    first.scatter_reduce_(0, segment, torch.arange(pixels.shape[0], device=segment.device), reduce="amin")
    pixel_tags = tags[image]
    return Segments(flat, segment, prototypes, pixel_label, image, region, pixel_tags,
                    pixel_label[first], image[first], region[first], pixel_tags[first])
