"""The tree filter along each image's spanning tree, forward only (TEL's
target carries no gradient). One program per (image, block of channels)
walks the image's top-down order: leaves -> root, then root -> leaves. The
batch's trees are one launch; the loop is over nodes, not over depth levels.

Memory: ``subtree`` (the launcher's copy of the values, then the subtree
sums) and ``whole`` (the whole-tree sums), float32 [B, n, C] each, plus the
normaliser's two columns per program ([B, channel blocks, n]) and the output. Every node's row is read and
written by the same program, and within it by the same thread (one warp,
the same channel offsets in every load and store: no replica of a channel in
another warp), so a later iteration sees what an earlier one stored without
a barrier.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_CHANNELS = 32      # one warp of 32 threads, one channel each
LOADS_PER_NODE = 7       # global loads per node and pass (order, parent, affinity, 2 rows, 2 normalisers)


@triton.jit
def tree_filter_kernel(order, parent, affinity, subtree, subtree_norm, whole, whole_norm, out,
                       nodes, channels, BLOCK_C: tl.constexpr):
    image = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < channels
    node0 = image * nodes                 # this image's first node in the [B * n] arrays
    row0 = node0 * channels               # and its first element in the [B * n, C] ones
    # the normaliser's columns are per program ([B, blocks, n]): each block of channels carries its own
    subtree_norm += (image * tl.num_programs(1) + tl.program_id(1)) * nodes - node0
    whole_norm += (image * tl.num_programs(1) + tl.program_id(1)) * nodes - node0

    # Pass 1, leaves -> root: visiting the order backwards finishes a node's subtree sum S before its
    # parent's is read; S_p += a_c * S_c for each child c. ``subtree`` starts as the values, the
    # normaliser's column as ones.
    for step in range(1, nodes):
        node = tl.load(order + node0 + nodes - step)
        up = tl.load(parent + node0 + node)
        a = tl.load(affinity + node0 + node)
        child = tl.load(subtree + row0 + node * channels + cols, mask=cmask, other=0.0)
        acc = tl.load(subtree + row0 + up * channels + cols, mask=cmask, other=0.0)
        tl.store(subtree + row0 + up * channels + cols, acc + a * child, mask=cmask)
        norm = tl.load(subtree_norm + node0 + up) + a * tl.load(subtree_norm + node0 + node)
        tl.store(subtree_norm + node0 + up, norm)

    # Pass 2, root -> leaves: T_root = S_root, T_i = (1 - a_i^2) S_i + a_i T_parent; the output row is
    # T_i / (the normaliser's T_i), written as soon as T_i is known.
    root = tl.load(order + node0)
    top = tl.load(subtree + row0 + root * channels + cols, mask=cmask, other=0.0)
    top_norm = tl.load(subtree_norm + node0 + root)
    tl.store(whole + row0 + root * channels + cols, top, mask=cmask)
    tl.store(whole_norm + node0 + root, top_norm)
    tl.store(out + row0 + root * channels + cols, top / top_norm, mask=cmask)
    for step in range(1, nodes):
        node = tl.load(order + node0 + step)
        up = tl.load(parent + node0 + node)
        a = tl.load(affinity + node0 + node)
        kept = 1.0 - a * a
        total = kept * tl.load(subtree + row0 + node * channels + cols, mask=cmask, other=0.0) \
            + a * tl.load(whole + row0 + up * channels + cols, mask=cmask, other=0.0)
        total_norm = kept * tl.load(subtree_norm + node0 + node) + a * tl.load(whole_norm + node0 + up)
        tl.store(whole + row0 + node * channels + cols, total, mask=cmask)
        tl.store(whole_norm + node0 + node, total_norm)
        tl.store(out + row0 + node * channels + cols, total / total_norm, mask=cmask)


def launch_tree_filter(values: torch.Tensor, parent: torch.Tensor, order: torch.Tensor,
                       affinity: torch.Tensor) -> torch.Tensor:
    """values [B, n, C] float32 contiguous, parent / order [B, n] int64, affinity [B, n] float32
    -> filtered [B, n, C] float32."""
    batch, nodes, channels = values.shape
    subtree = values.clone()
    grid = (batch, triton.cdiv(channels, BLOCK_CHANNELS))
    subtree_norm = torch.ones(batch, grid[1], nodes, device=values.device, dtype=torch.float32)
    whole = torch.empty_like(values)
    whole_norm = torch.empty_like(subtree_norm)
    out = torch.empty_like(values)
    tree_filter_kernel[grid](order, parent, affinity, subtree, subtree_norm, whole, whole_norm, out,
                             nodes, channels, BLOCK_C=BLOCK_CHANNELS, num_warps=1)
    return out
