"""SegSort's per-image spherical (von Mises-Fisher) k-means, for a whole batch
at once (docs/method.md, segments): clusters carry the image (group) they started in, and the
E-step only considers the clusters of the pixel's own image, so one
nearest_prototype call serves every image; no Python loop over images.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _validate as check
from .dispatch import select_backend
from .nearest_prototype import nearest_prototype
from .segment_prototypes import segment_prototypes


def grid_assignment(batch_size: int, height: int, width: int, grid_rows: int, grid_cols: int,
                    device: Optional[torch.device] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial clusters: a regular grid_rows x grid_cols grid per image.

    Returns (assignment [B*H*W] int64 with ids in [0, B*grid_rows*grid_cols),
    groups [B*H*W] int64 = image index), pixels in (image, y, x) order."""
    for name, value in (("batch_size", batch_size), ("height", height), ("width", width),
                        ("grid_rows", grid_rows), ("grid_cols", grid_cols)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    rows = torch.arange(height, device=device) * grid_rows // height
    cols = torch.arange(width, device=device) * grid_cols // width
    cell = (rows[:, None] * grid_cols + cols[None, :]).reshape(-1)                  # [H*W]
    images = torch.arange(batch_size, device=device)
    assignment = (images[:, None] * (grid_rows * grid_cols) + cell[None, :]).reshape(-1)
    groups = images.repeat_interleave(height * width)
    return assignment, groups


def spherical_kmeans(features: torch.Tensor, init_assignment: torch.Tensor, iterations: int = 10,
                     groups: Optional[torch.Tensor] = None, *, backend: str = "auto"):
    """Spherical k-means inside each group (image).

    Args:
        features: [N, D] float, L2-normalised rows (embedding + location in SegSort).
        init_assignment: [N] integer cluster ids in [0, C); a cluster must not span groups.
        iterations: number of (M-step, E-step) rounds, >= 0.
        groups: [N] integer >= 0 image index of each pixel; None = one image.
    Returns:
        (assignment [N] int64 in [0, C), prototypes [C, D] float32). The cluster
        count stays fixed; a cluster that empties has a zero prototype and
        receives no pixels again. Not differentiable.
    """
    check.check_matrix("features", features)
    num_pixels = features.shape[0]
    if not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"iterations must be a non-negative int, got {iterations!r}")
    assignment = check.check_index_vector("init_assignment", init_assignment, num_pixels, features.device,
                                          upper=2**62)
    num_clusters = int(assignment.max()) + 1
    if groups is None:
        groups = torch.zeros(num_pixels, dtype=torch.int64, device=features.device)
    groups = check.check_index_vector("groups", groups, num_pixels, features.device, upper=2**62)
    cluster_groups = torch.full((num_clusters,), -1, dtype=torch.int64, device=features.device)
    cluster_groups.scatter_(0, assignment, groups)
    if not torch.equal(cluster_groups[assignment], groups):
        raise ValueError("init_assignment puts pixels of different groups in one cluster")
    backend = select_backend(backend, features)
    with torch.no_grad():
        for _ in range(iterations):
            prototypes, counts = segment_prototypes(features, assignment, num_clusters,
                                                    backend=backend, return_counts=True)
            live_groups = torch.where(counts > 0, cluster_groups, torch.full_like(cluster_groups, -1))
            nearest, _ = nearest_prototype(features, prototypes.to(features.dtype), 1, groups, live_groups,
                                           backend=backend)
            assignment = nearest[:, 0]
        prototypes = segment_prototypes(features, assignment, num_clusters, backend=backend)
    return assignment, prototypes
