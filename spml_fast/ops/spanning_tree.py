"""Minimum spanning trees of the images' 4-connected pixel grids, rooted and
ordered for the tree filter (``tree_filter``).

A tree is delivered as a ``Forest``: every pixel's parent and one top-down
order (a parent before its children), per image, in local pixel indices.
The tree filter walks that order backwards then forwards; nothing else is
needed, so no depth levels are built. Two builders, one minimum tree (every
minimum spanning tree has the same sorted edge weights; tested):

- ``host``: scipy's minimum spanning tree and breadth-first order, compiled
  code, one call each per image, no Python loop over pixels; distances and
  parent affinities in numpy beside it (``feature_tree``: one copy of the
  features to the host, none of the intermediates as tensors). The CPU path,
  and the data loader's workers' (the colour tree, off the training step).
- ``triton``: Borůvka on the device, then the tree rooted and ordered by an
  Euler tour ranked by pointer jumping (``triton_kernels.spanning_tree``):
  six launches whatever the size or depth, no host synchronisation. The CUDA
  path; the tests run it through the interpreter.

``auto`` takes ``triton`` for CUDA tensors (or inside
``dispatch.use_backend("triton")``) and ``host`` otherwise.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from .dispatch import select_tree_backend

CUT = 1e4          # distance of an edge that touches a padding pixel: affinity 0, nothing crosses it


def use_triton(backend: str, tensor: torch.Tensor) -> bool:
    """Whether the tree ops take their Triton path (``dispatch.select_tree_backend``)."""
    return select_tree_backend(backend, tensor) == "triton"


@dataclass
class Forest:
    """One spanning tree per image of a batch, rooted at pixel 0, in local (row-major) pixel indices.

    parent: [B, n] int64, a root is its own parent; order: [B, n] int64, every pixel once, a parent
    before its children (root first)."""

    parent: torch.Tensor
    order: torch.Tensor

    def to(self, device) -> "Forest":
        return Forest(self.parent.to(device, non_blocking=True), self.order.to(device, non_blocking=True))


@functools.lru_cache(maxsize=16)
def grid_edges(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(first, second) pixel indices [E] int64 of the 4-connected grid's edges: the horizontal edges
    row-major, then the vertical ones. E = h (w - 1) + (h - 1) w."""
    index = np.arange(height * width).reshape(height, width)
    first = np.concatenate([index[:, :-1].ravel(), index[:-1, :].ravel()])
    second = np.concatenate([index[:, 1:].ravel(), index[1:, :].ravel()])
    return first, second


def host_array(tensor: torch.Tensor, dtype) -> np.ndarray:
    """A tensor's values as a numpy array of ``dtype`` (bfloat16, which numpy lacks, through float32)."""
    tensor = tensor.detach() if tensor.requires_grad else tensor
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.cpu().numpy().astype(dtype, copy=False)


@torch.no_grad()
def edge_distances(features: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """features [B, C, h, w] any float dtype, valid [B, h, w] bool -> distances [B, E] float32 of the grid's
    edges (``grid_edges`` order): Euclidean distance of the neighbours' features, ``CUT`` where an edge
    touches padding."""
    flat = features.float()
    right = (flat[..., :, 1:] - flat[..., :, :-1]).norm(dim=1)             # [B, h, w-1]
    down = (flat[..., 1:, :] - flat[..., :-1, :]).norm(dim=1)              # [B, h-1, w]
    both = torch.cat([right.flatten(1), down.flatten(1)], 1)
    keep = torch.cat([(valid[..., :, 1:] & valid[..., :, :-1]).flatten(1), (valid[..., 1:, :] & valid[..., :-1, :]).flatten(1)], 1)
    return torch.where(keep, both, torch.full_like(both, CUT))


@torch.no_grad()
def parent_affinity(features: torch.Tensor, forest: Forest, sigma: float) -> torch.Tensor:
    """features [B, C, h, w] -> affinity [B, n] float32 of each pixel's edge to its parent,
    exp(-|f_i - f_parent| / sigma); a root's is 0 (it has no edge)."""
    flat = features.float().flatten(2)                                      # [B, C, n]
    up = flat.gather(2, forest.parent[:, None, :].expand(-1, flat.shape[1], -1))
    affinity = torch.exp(-(flat - up).norm(dim=1) / sigma)
    is_root = forest.parent == torch.arange(forest.parent.shape[1], device=forest.parent.device)
    return affinity.masked_fill(is_root, 0.0)


def _check(distances: torch.Tensor, height: int, width: int) -> None:
    if distances.dim() != 2 or distances.shape[1] != height * (width - 1) + (height - 1) * width:
        raise ValueError(f"distances must be [B, E] with E = {height * (width - 1) + (height - 1) * width} "
                         f"edges of a {height}x{width} grid, got {tuple(distances.shape)}")
    if height < 1 or width < 1:
        raise ValueError(f"the grid must have at least one pixel, got {height}x{width}")


def feature_tree(features: torch.Tensor, valid: torch.Tensor, sigma: float, backend: str = "auto"
                 ) -> tuple[Forest, torch.Tensor]:
    """features [B, C, h, w] float (colours or embeddings), valid [B, h, w] bool -> (the minimum spanning
    ``Forest`` of the feature distances, affinity [B, n] float32 of each pixel's edge to its parent,
    ``parent_affinity``; the same tree and values), on the features' device."""
    height, width = features.shape[-2:]
    if features.dim() != 4 or tuple(valid.shape) != (features.shape[0], height, width):
        raise ValueError(f"features must be [B, C, h, w] and valid [B, h, w], got {tuple(features.shape)} and "
                         f"{tuple(valid.shape)}")
    if use_triton(backend, features):
        from ..triton_kernels.spanning_tree import launch_edge_distances, launch_spanning_forest
        features = features.detach().contiguous()
        distances = launch_edge_distances(features, valid.contiguous(), CUT)
        parent, order, affinity = launch_spanning_forest(distances, height, width, features, sigma)
        return Forest(parent, order), affinity
    flat = host_array(features, np.float32)
    mask = host_array(valid, bool)
    right = np.sqrt(np.square(flat[..., :, 1:] - flat[..., :, :-1]).sum(1))
    down = np.sqrt(np.square(flat[..., 1:, :] - flat[..., :-1, :]).sum(1))
    keep = np.concatenate([(mask[..., :, 1:] & mask[..., :, :-1]).reshape(len(mask), -1),
                           (mask[..., 1:, :] & mask[..., :-1, :]).reshape(len(mask), -1)], 1)
    distances = np.where(keep, np.concatenate([right.reshape(len(flat), -1), down.reshape(len(flat), -1)], 1), CUT)
    parents, orders = _host_forest(distances, height, width)
    flat = flat.reshape(flat.shape[0], flat.shape[1], -1)
    gap = np.sqrt(np.square(flat - np.take_along_axis(flat, parents[:, None, :], 2)).sum(1))
    affinity = np.exp(-gap / sigma).astype(np.float32)
    affinity[parents == np.arange(height * width)] = 0.0
    device = features.device
    return (Forest(torch.from_numpy(parents).to(device), torch.from_numpy(orders).to(device)),
            torch.from_numpy(affinity).to(device))


def spanning_forest(distances: torch.Tensor, height: int, width: int, backend: str = "auto") -> Forest:
    """distances [B, E] float >= 0 of the grid edges (``edge_distances``) -> the minimum spanning tree of
    each image, rooted at pixel 0, as a ``Forest`` on the distances' device."""
    _check(distances, height, width)
    if use_triton(backend, distances):
        from ..triton_kernels.spanning_tree import launch_spanning_forest
        parent, order, _ = launch_spanning_forest(distances.float().contiguous(), height, width)
        return Forest(parent, order)
    parents, orders = _host_forest(host_array(distances, np.float64), height, width)
    return Forest(torch.from_numpy(parents), torch.from_numpy(orders)).to(distances.device)


def _host_forest(distances: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """distances [B, E] -> (parent, order) [B, n] int64 numpy arrays."""
    from scipy.sparse import csr_array
    from scipy.sparse.csgraph import breadth_first_order, minimum_spanning_tree
    nodes = height * width
    first, second = grid_edges(height, width)
    weights = distances.astype(np.float64) + 1e-9      # scipy drops zero-weight edges
    parents = np.empty((len(weights), nodes), dtype=np.int64)
    orders = np.empty((len(weights), nodes), dtype=np.int64)
    for image, weight in enumerate(weights):
        tree = minimum_spanning_tree(csr_array((weight, (first, second)), shape=(nodes, nodes)))
        order, predecessor = breadth_first_order(tree, 0, directed=False, return_predecessors=True)
        orders[image] = order
        parents[image] = np.where(predecessor < 0, np.arange(nodes), predecessor)
    return parents, orders


def tree_weight(forest: Forest, distances: torch.Tensor, height: int, width: int) -> list[float]:
    """The total distance of each image's tree edges (float64 sums of the sorted edge weights: equal for
    every minimum spanning tree of the same graph). For tests and checks."""
    first, second = grid_edges(height, width)
    lookup = {}
    for edge, (a, b) in enumerate(zip(first.tolist(), second.tolist())):
        lookup[(a, b)] = lookup[(b, a)] = edge
    totals = []
    for image in range(forest.parent.shape[0]):
        parent = forest.parent[image].tolist()
        chosen = [float(distances[image, lookup[(node, up)]]) for node, up in enumerate(parent) if up != node]
        totals.append(float(np.sum(np.sort(np.array(chosen, dtype=np.float64)))))
    return totals
