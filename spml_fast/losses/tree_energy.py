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

The filter costs O(pixels x classes) per tree: one pass from the leaves to
the root sums each subtree, one from the root to the leaves adds the rest
of the tree (the linear-time algorithm of the learnable tree filter, Song
et al., 2019). Both passes run level by level (nodes of equal depth at
once), as torch index operations on the batch's forest.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

CUT = 1e4          # distance of an edge that touches a padding pixel: affinity 0, nothing crosses it


@dataclass(frozen=True)
class TreeEnergyConfig:
    colour_sigma: float = 0.1       # low-level tree: affinity exp(-|rgb_i - rgb_j| / sigma), rgb in [0, 1]
    feature_sigma: float = 0.2      # high-level tree: affinity exp(-|e_i - e_j| / sigma), unit embeddings


@dataclass
class Forest:
    """Spanning trees of the images of a batch as one forest over the B*h*w pixels (row-major)."""

    parent: torch.Tensor            # [N] int64, a root is its own parent
    levels: list                    # [depth-1] int64 tensors: the nodes at depth 1, 2, ... (roots excluded)


def _grid_edges(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(first, second) pixel indices [E] of the 4-connected grid's edges, row-major."""
    index = np.arange(height * width).reshape(height, width)
    first = np.concatenate([index[:, :-1].ravel(), index[:-1, :].ravel()])
    second = np.concatenate([index[:, 1:].ravel(), index[1:, :].ravel()])
    return first, second


def edge_distances(features: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """features [B, C, h, w], valid [B, h, w] bool -> distances [B, E] of the grid's edges (``_grid_edges``
    order): Euclidean distance of the neighbours' features, ``CUT`` where an edge touches padding."""
    batch, channels, height, width = features.shape
    first, second = (torch.from_numpy(e).to(features.device) for e in _grid_edges(height, width))
    flat = features.detach().float().reshape(batch, channels, -1)
    distance = (flat[:, :, first] - flat[:, :, second]).norm(dim=1)
    mask = valid.reshape(batch, -1)
    return torch.where(mask[:, first] & mask[:, second], distance, torch.full_like(distance, CUT))


def spanning_forest(distances: torch.Tensor, height: int, width: int) -> Forest:
    """distances [B, E] of the grid edges -> the minimum spanning tree of each image, rooted at its
    pixel 0, as one ``Forest`` over B*h*w nodes."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import breadth_first_order, minimum_spanning_tree
    batch = distances.shape[0]
    nodes = height * width
    first, second = _grid_edges(height, width)
    parents, depths = [], []
    weights = distances.detach().cpu().double().numpy() + 1e-9     # scipy drops zero-weight edges
    for image in range(batch):
        graph = coo_matrix((weights[image], (first, second)), shape=(nodes, nodes)).tocsr()
        tree = minimum_spanning_tree(graph)
        order, predecessor = breadth_first_order(tree, 0, directed=False, return_predecessors=True)
        parent = np.where(predecessor < 0, np.arange(nodes), predecessor)
        depth = np.zeros(nodes, dtype=np.int64)
        for node in order[1:]:                          # BFS order: a parent comes before its children
            depth[node] = depth[parent[node]] + 1
        parents.append(parent + image * nodes)
        depths.append(depth)
    parent = np.concatenate(parents)
    depth = np.concatenate(depths)
    by_depth = np.argsort(depth, kind="stable")
    bounds = np.searchsorted(depth[by_depth], np.arange(1, depth.max() + 2))
    levels = [torch.from_numpy(by_depth[bounds[d]:bounds[d + 1]]).to(distances.device)
              for d in range(len(bounds) - 1)]
    return Forest(torch.from_numpy(parent).to(distances.device), levels)


def tree_filter(values: torch.Tensor, forest: Forest, affinity: torch.Tensor) -> torch.Tensor:
    """values [N, C] float32, affinity [N] float32 (of each node's edge to its parent; roots: unused)
    -> [N, C]: for every node, sum_j A(i, j) values_j / sum_j A(i, j) over its tree, A(i, j) the
    product of the edge affinities on the path (A(i, i) = 1)."""
    values = torch.cat([values.float(), values.new_ones(values.shape[0], 1, dtype=torch.float32)], 1)
    parent, weight = forest.parent, affinity.float()[:, None]
    subtree = values.clone()                             # leaves -> root: sum over each subtree
    for nodes in reversed(forest.levels):
        subtree.index_add_(0, parent[nodes], weight[nodes] * subtree[nodes])
    total = subtree.clone()                              # root -> leaves: add the rest of the tree
    for nodes in forest.levels:
        total[nodes] = subtree[nodes] + weight[nodes] * (total[parent[nodes]] - weight[nodes] * subtree[nodes])
    return total[:, :-1] / total[:, -1:]


def _filter_along(values: torch.Tensor, features: torch.Tensor, valid: torch.Tensor, sigma: float) -> torch.Tensor:
    """values [N, C]; the tree and affinities from features [B, F, h, w]."""
    batch, _, height, width = features.shape
    forest = spanning_forest(edge_distances(features, valid), height, width)
    flat = features.detach().float().permute(0, 2, 3, 1).reshape(batch * height * width, -1)
    distance = (flat - flat[forest.parent]).norm(dim=1)
    return tree_filter(values, forest, torch.exp(-distance / sigma))


def tree_energy_loss(probabilities: torch.Tensor, colours: torch.Tensor, embeddings: torch.Tensor,
                     unlabelled: torch.Tensor, valid: torch.Tensor,
                     config: TreeEnergyConfig = TreeEnergyConfig()) -> torch.Tensor:
    """probabilities [B, K, h, w] (softmax of the head, with gradient), colours [B, 3, h, w] in [0, 1],
    embeddings [B, D, h, w], unlabelled / valid [B, h, w] bool -> float32 scalar (0 without
    unlabelled pixels)."""
    batch, classes, height, width = probabilities.shape
    flat = probabilities.float().permute(0, 2, 3, 1).reshape(-1, classes)
    with torch.no_grad():
        target = _filter_along(flat.detach(), colours, valid, config.colour_sigma)
        target = _filter_along(target, embeddings, valid, config.feature_sigma)
    chosen = (unlabelled & valid).reshape(-1)
    if not bool(chosen.any()):
        return flat.sum() * 0
    return (flat[chosen] - target[chosen]).abs().sum(1).mean()
