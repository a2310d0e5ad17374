"""Streaming top-k of cosine similarity between pixels and prototypes.

A program per pixel tile streams the prototype tiles and keeps, per pixel,
the k best (similarity, index) pairs in registers ([BLOCK_N, K_PAD]; slots
>= k hold +inf so they are never the one replaced). Per tile, k rounds move
the tile's best remaining candidate into the slot of the current worst when
it beats it. Nothing N x M is stored. The caller sorts the k slots.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import nearest_config
from .utils import block_dim, dot, ieee_dot, load_rows, load_rows_transposed


@triton.jit
def nearest_prototype_kernel(
    embeddings, prototypes, pixel_groups, prototype_groups, values_out, indices_out,
    N, M, D, K,
    stride_en, stride_ed, stride_pm, stride_pd,
    HAS_GROUPS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, K_PAD: tl.constexpr,
):
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    offs_k = tl.arange(0, K_PAD)
    pixel_tile = load_rows(embeddings, offs_n, mask_n, offs_d, mask_d, stride_en, stride_ed)
    if HAS_GROUPS:
        group_i = tl.load(pixel_groups + offs_n, mask=mask_n, other=-1)

    best_values = tl.where(offs_k[None, :] < K, float("-inf"), float("inf")) + tl.zeros([BLOCK_N, K_PAD], tl.float32)
    best_indices = tl.full([BLOCK_N, K_PAD], -1, tl.int64)
    for start_m in range(0, M, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M).to(tl.int64)
        mask_m = offs_m < M
        prototype_tile_t = load_rows_transposed(prototypes, offs_m, mask_m, offs_d, mask_d, stride_pm, stride_pd)
        similarity = dot(pixel_tile, prototype_tile_t, IEEE)                       # [BLOCK_N, BLOCK_M]
        eligible = mask_m[None, :] & mask_n[:, None]
        if HAS_GROUPS:
            group_s = tl.load(prototype_groups + offs_m, mask=mask_m, other=-1)
            eligible = eligible & (group_i[:, None] == group_s[None, :])
        similarity = tl.where(eligible, similarity, float("-inf"))
        for _ in range(K):
            candidate = tl.max(similarity, axis=1)
            candidate_col = tl.argmax(similarity, axis=1)
            worst = tl.min(best_values, axis=1)
            worst_slot = tl.argmin(best_values, axis=1)
            better = candidate > worst
            replace = (offs_k[None, :] == worst_slot[:, None]) & better[:, None]
            best_values = tl.where(replace, candidate[:, None], best_values)
            best_indices = tl.where(replace, start_m + candidate_col[:, None].to(tl.int64), best_indices)
            taken = (tl.arange(0, BLOCK_M)[None, :] == candidate_col[:, None]) & better[:, None]
            similarity = tl.where(taken, float("-inf"), similarity)
    out_offsets = offs_n[:, None] * K + offs_k[None, :]
    out_mask = mask_n[:, None] & (offs_k[None, :] < K)
    tl.store(values_out + out_offsets, best_values, mask=out_mask)
    tl.store(indices_out + out_offsets, best_indices, mask=out_mask)


def launch_nearest_prototype(embeddings, prototypes, k: int, pixel_groups=None, prototype_groups=None):
    """embeddings [N, D], prototypes [M, D] -> unsorted top-k (values [N, k] float32, indices [N, k] int64);
    missing neighbours (fewer than k eligible prototypes) are (-inf, -1)."""
    num_pixels, dim = embeddings.shape
    values = torch.empty(num_pixels, k, device=embeddings.device, dtype=torch.float32)
    indices = torch.empty(num_pixels, k, device=embeddings.device, dtype=torch.int64)
    has_groups = pixel_groups is not None
    config = nearest_config(embeddings.device, block_dim(dim))
    nearest_prototype_kernel[(triton.cdiv(num_pixels, config.block_n),)](
        embeddings, prototypes, pixel_groups if has_groups else values, prototype_groups if has_groups else values,
        values, indices, num_pixels, prototypes.shape[0], dim, k,
        embeddings.stride(0), embeddings.stride(1), prototypes.stride(0), prototypes.stride(1),
        HAS_GROUPS=has_groups, IEEE=ieee_dot(embeddings.dtype),
        BLOCK_N=config.block_n, BLOCK_M=config.block_m, BLOCK_D=block_dim(dim),
        K_PAD=max(2, triton.next_power_of_2(k)), num_warps=config.launch.num_warps,
        num_stages=config.launch.num_stages)
    return values, indices
