"""Label-defined membership of (pixel, segment) pairs in PyTorch (docs/method.md, the loss).

Used by the tiled CPU path on one pixel chunk at a time and by the dense
reference on the whole batch; the Triton kernels have their own copy in
``triton_kernels/utils.py`` (``tile_partners`` and ``tile_positives``, on the plan of ``contrast_plan``).
"""
from __future__ import annotations

from typing import Optional

import torch


def membership(pixel_labels: torch.Tensor, prototype_labels: torch.Tensor,
               pixel_groups: Optional[torch.Tensor] = None,
               prototype_groups: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive, negative) bool masks [n, M] before the own-segment rule.

    pixel_labels [n] / prototype_labels [M] int64 class ids (-1 = unlabelled),
    or [n, W] / [M, W] int64 bit sets; groups [n] / [M] int64 or None.
    """
    if pixel_labels.dim() == 2:  # set mode: positive iff the class sets intersect
        shared = (pixel_labels[:, None, :] & prototype_labels[None, :, :]).ne(0).any(-1)
        positive, negative = shared, ~shared
    else:
        labelled = (pixel_labels[:, None] >= 0) & (prototype_labels[None, :] >= 0)
        same = pixel_labels[:, None] == prototype_labels[None, :]
        positive, negative = labelled & same, labelled & ~same
    if pixel_groups is not None:
        same_group = pixel_groups[:, None] == prototype_groups[None, :]
        positive, negative = positive & same_group, negative & same_group
    return positive, negative


def participating_pixels(pixel_labels: torch.Tensor) -> torch.Tensor:
    """[N] bool: labelled pixels in single-label mode, every pixel in set mode."""
    if pixel_labels.dim() == 2:
        return torch.ones(pixel_labels.shape[0], dtype=torch.bool, device=pixel_labels.device)
    return pixel_labels >= 0


def reduce_pixel_losses(per_pixel: torch.Tensor, participating: torch.Tensor, reduction: str) -> torch.Tensor:
    """Apply the the loss section's reduction to per-pixel losses [N] (0 where not participating)."""
    if reduction == "none":
        return per_pixel
    if reduction == "sum":
        return per_pixel.sum()
    return per_pixel.sum() / participating.sum().clamp(min=1)


def row_ids(key: torch.Tensor) -> torch.Tensor:
    """Dense ids of the distinct rows of key [P, K] int64, numbered in sorted row order: [P] int64.

    One 1-D unique per column (torch.unique(dim=0) goes row by row in Python-visible
    ops and costs more than the whole loss here); ids stay < P, so combining
    the running id with the next column's id never overflows int64."""
    ids = torch.zeros(key.shape[0], dtype=torch.int64, device=key.device)
    for column in key.unbind(1):
        values, column_ids = torch.unique(column, return_inverse=True)
        ids = torch.unique(ids * values.shape[0] + column_ids, return_inverse=True)[1]
    return ids
