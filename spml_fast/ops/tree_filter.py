"""The tree filter: every pixel's affinity-weighted average over all pixels of
its image, the affinity of two pixels being the product of the edge
affinities on the tree path between them.

    out_i = sum_j A(i, j) v_j / sum_j A(i, j),   A(i, i) = 1

Linear time in two passes over a top-down order (the learnable tree filter's
algorithm, Song et al. 2019), each node's edge affinity a_i to its parent p_i:

    leaves -> root   S_i = v_i + sum over children c of a_c S_c        (subtree sums)
    root -> leaves   T_root = S_root,  T_i = (1 - a_i^2) S_i + a_i T_p_i  (whole-tree sums)

the normaliser sum_j A(i, j) being the same passes over a column of ones.
Three implementations, one result:

- ``triton`` (CUDA): one program per (image, block of channels) walks the
  order in one loop per pass (``triton_kernels.tree_filter``); one launch for
  the batch. Memory: two float32 [B, n, C] scratch buffers and the output.
- ``host`` (CPU): each pass is one sparse triangular solve over the batch's
  block-diagonal forest in the top-down numbering (scipy/SuperLU, compiled):
  (I - U) S = v with U[p, c] = a_c strictly upper, then
  (I - L) T = (1 - a^2) S with L[c, p] = a_c strictly lower. float64.
- ``reference``: the same passes level by level (nodes of equal depth at
  once) in torch index ops; 2 x depth steps. Kept for the tests.

No gradient flows through the filter: TEL's target is computed without one.
"""
from __future__ import annotations

import numpy as np
import torch

from .spanning_tree import Forest, host_array, use_triton


def _check(values: torch.Tensor, forest: Forest, affinity: torch.Tensor) -> None:
    if values.dim() != 3:
        raise ValueError(f"values must be [B, n, C], got {tuple(values.shape)}")
    shape = tuple(values.shape[:2])
    for name, tensor in (("forest.parent", forest.parent), ("forest.order", forest.order), ("affinity", affinity)):
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must be [B, n] = {list(shape)} like values, got {tuple(tensor.shape)}")


def tree_filter(values: torch.Tensor, forest: Forest, affinity: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """values [B, n, C] float (any float dtype), forest over the n pixels of each image, affinity [B, n]
    float in [0, 1] (each pixel's edge to its parent; a root's is ignored) -> filtered [B, n, C] float32."""
    _check(values, forest, affinity)
    with torch.no_grad():
        if use_triton(backend, values):
            from ..triton_kernels.tree_filter import launch_tree_filter
            return launch_tree_filter(values.float().contiguous(), forest.parent.contiguous(),
                                      forest.order.contiguous(), affinity.float().contiguous())
        return tree_filter_host(values, forest, affinity)


def tree_filter_host(values: torch.Tensor, forest: Forest, affinity: torch.Tensor) -> torch.Tensor:
    """The ``host`` path: two sparse triangular solves for the whole batch."""
    from scipy.sparse import csr_array
    from scipy.sparse.linalg import spsolve_triangular
    batch, nodes, channels = values.shape
    total = batch * nodes
    offset = (np.arange(batch) * nodes)[:, None]
    order = (host_array(forest.order, np.int64) + offset).ravel()                  # position k -> node
    parent = (host_array(forest.parent, np.int64) + offset).ravel()                # node -> parent node
    position = np.empty(total, dtype=np.int64)
    position[order] = np.arange(total)
    up = position[parent[order]]                                           # position k -> parent's position
    weight = host_array(affinity, np.float64).ravel()[order]
    child = np.flatnonzero(up != np.arange(total))                         # every position but the roots
    diagonal = np.arange(total)
    rows, cols = np.concatenate([diagonal, up[child]]), np.concatenate([diagonal, child])
    entries = np.concatenate([np.ones(total), -weight[child]])
    ones = np.ones((total, 1))
    stacked = np.concatenate([host_array(values, np.float64).reshape(total, channels), ones], 1)[order]
    subtree = spsolve_triangular(csr_array((entries, (rows, cols)), shape=(total, total)), stacked,
                                 lower=False, unit_diagonal=True)
    kept = np.ones(total)
    kept[child] = 1.0 - weight[child] ** 2
    whole = spsolve_triangular(csr_array((entries, (cols, rows)), shape=(total, total)), kept[:, None] * subtree,
                               lower=True, unit_diagonal=True)
    result = np.empty_like(whole)
    result[order] = whole
    filtered = result[:, :channels] / result[:, channels:]
    return torch.from_numpy(filtered.astype(np.float32)).reshape(batch, nodes, channels).to(values.device)


def depths(forest: Forest) -> torch.Tensor:
    """[B, n] int64 depth of every pixel (root 0), by pointer jumping: ceil(log2 n) gathers."""
    ancestor = forest.parent.clone()
    depth = (ancestor != torch.arange(ancestor.shape[1], device=ancestor.device)).long()
    for _ in range(max(1, int(np.ceil(np.log2(max(2, ancestor.shape[1])))))):
        depth = depth + depth.gather(1, ancestor)
        ancestor = ancestor.gather(1, ancestor)
    return depth


def tree_filter_reference(values: torch.Tensor, forest: Forest, affinity: torch.Tensor) -> torch.Tensor:
    """The passes level by level over the batch's forest in torch ops: the reference the other paths are
    tested against. Same arguments and result as ``tree_filter``."""
    _check(values, forest, affinity)
    batch, nodes, channels = values.shape
    offset = torch.arange(batch, device=values.device)[:, None] * nodes
    parent = (forest.parent + offset).ravel()
    depth = depths(forest).ravel()
    by_depth = torch.argsort(depth, stable=True)
    counts = torch.bincount(depth).tolist()
    levels = list(torch.split(by_depth, counts))[1:]                       # roots excluded
    flat = values.detach().float().reshape(-1, channels)
    flat = torch.cat([flat, flat.new_ones(flat.shape[0], 1)], 1)
    weight = affinity.detach().float().reshape(-1, 1)
    subtree = flat.clone()
    for level in reversed(levels):
        subtree.index_add_(0, parent[level], weight[level] * subtree[level])
    whole = subtree.clone()
    for level in levels:
        whole[level] = (1 - weight[level] ** 2) * subtree[level] + weight[level] * whole[parent[level]]
    return (whole[:, :channels] / whole[:, channels:]).reshape(batch, nodes, channels)
