"""The tree-energy loss (TEL; Liang et al., CVPR 2022) for sparse labels.

Each image's pixel grid (4-connected) gets a minimum spanning tree on the
distance between neighbours, once on colour (low level) and once on the
embedding (high level). Filtering a map along a tree gives every pixel the
affinity-weighted average over *all* pixels of the image, the affinity of
two pixels being the product of the edge affinities exp(-distance / sigma)
on the tree path between them: it stays high inside a region and falls at
its boundary. The head's class probabilities P are filtered along the
colour tree, then along the embedding tree, and the result Y (no gradient)
is the soft target of the unlabelled pixels: loss = mean over unlabelled
pixels of sum_k |P_k - Y_k|.

The trees and the filter are ops (``spml_fast.ops.spanning_tree``,
``spml_fast.ops.tree_filter``): on CUDA, Triton kernels with no host
synchronisation; on the CPU, scipy's compiled routines. The colour tree
depends only on the augmented image, so training builds it in the data
loader's workers (``colour_tree``) and hands it over with the batch; the
embedding tree changes every step and is built in it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from ..ops.spanning_tree import Forest, feature_tree
from ..ops.tree_filter import tree_filter


@dataclass(frozen=True)
class TreeEnergyConfig:
    colour_sigma: float = 0.1       # low-level tree: affinity exp(-|rgb_i - rgb_j| / sigma), rgb in [0, 1]
    feature_sigma: float = 0.2      # high-level tree: affinity exp(-|e_i - e_j| / sigma), unit embeddings


@dataclass
class ColourTree:
    """The colour tree of a batch: ``forest`` over each image's h*w pixels and ``affinity`` [B, n]
    float32 of each pixel's edge to its parent. The data pipeline delivers it under ``KEYS``."""

    forest: Forest
    affinity: torch.Tensor

    KEYS: ClassVar[tuple] = ("colour_parent", "colour_order", "colour_affinity")

    @classmethod
    def from_batch(cls, batch: dict) -> Optional["ColourTree"]:
        """The tree a batch carries, or None if its pipeline did not build one."""
        if not all(key in batch for key in cls.KEYS):
            return None
        return cls(Forest(batch["colour_parent"], batch["colour_order"]), batch["colour_affinity"])

    def items(self) -> dict:
        """{key: tensor} as a batch carries it."""
        return dict(zip(self.KEYS, (self.forest.parent, self.forest.order, self.affinity)))


def colour_tree(colours: torch.Tensor, valid: torch.Tensor, sigma: float) -> ColourTree:
    """colours [B, 3, h, w] in [0, 1], valid [B, h, w] bool -> the batch's ``ColourTree``."""
    return ColourTree(*feature_tree(colours, valid, sigma))


def tree_energy_loss(probabilities: torch.Tensor, colours: torch.Tensor, embeddings: torch.Tensor,
                     unlabelled: torch.Tensor, valid: torch.Tensor,
                     config: TreeEnergyConfig = TreeEnergyConfig(),
                     colour: Optional[ColourTree] = None) -> torch.Tensor:
    """probabilities [B, K, h, w] (softmax of the head, with gradient), colours [B, 3, h, w] in [0, 1],
    embeddings [B, D, h, w], unlabelled / valid [B, h, w] bool -> float32 scalar (0 without
    unlabelled pixels). ``colour``: the colour tree if the data pipeline built it (else built here)."""
    height, width = probabilities.shape[-2:]
    flat = probabilities.float().flatten(2).transpose(1, 2)                   # [B, n, K]
    if colour is not None and colour.affinity.shape != (probabilities.shape[0], height * width):
        raise ValueError(f"the batch's colour tree covers {tuple(colour.affinity.shape)} pixels, the prediction "
                         f"{(probabilities.shape[0], height * width)}: the data pipeline built it for another size")
    with torch.no_grad():
        colour = colour if colour is not None else colour_tree(colours, valid, config.colour_sigma)
        target = tree_filter(flat, colour.forest, colour.affinity)
        target = tree_filter(target, *feature_tree(embeddings, valid, config.feature_sigma))
    chosen = (unlabelled & valid).flatten(1).float()
    per_pixel = (flat - target).abs().sum(2)
    # the mean over the chosen pixels without asking the host whether there are any (0 if none)
    return (per_pixel * chosen).sum() / chosen.sum().clamp(min=1.0)
