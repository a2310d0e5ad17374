"""Backward of the pixel-to-segment contrastive loss, by recomputation.

dL/dlogit for a pair (unit upstream gradient g, own segment excluded) is
  negative pair: exp(l - lse_all)
  positive pair: exp(l - lse_all) - exp(l - lse_positive)
               = exp(l - lse_positive) * (exp(lse_positive - lse_all) - 1)
so each pair costs one exp2 with a per-row offset and a per-row factor,
both bounded (exponent <= 0, factor in [-1, 0]): nothing overflows, for any
kappa. The caller stores per sorted pixel ``row_stats`` [n_pad, 4] =
(offset S-, offset S+, factor S-, factor S+) in log2 units, the upstream
gradient (scaled to [-1, 1]) folded into the factors; padded rows are 0.

Two kernels rather than one kernel with atomics:
- ``grad_embeddings_kernel``: a program per pixel tile walks its visit list
  (as the forward) and accumulates dE = G @ P in registers;
- ``grad_prototypes_kernel``: a program per (prototype tile, split of its
  visit list) computes the transposed tile G^T = (P E^T) directly, like the
  fused-attention dK/dV kernel, and accumulates dP = G^T @ E; the splits
  write float32 partials [S, m_pad, BLOCK_D], summed afterwards.
Atomics on dP would make float32 sums depend on scheduling order; with two
kernels and a fixed visit order training stays bit-reproducible, which
resuming a killed run exactly relies on.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import LOG2E, dot, ieee_dot, load_row_ranges, load_tile, tile_membership


@triton.jit
def _masked_grad(logits, positive, negative, offset_negative, offset_positive, factor_negative, factor_positive):
    """G of a masked tile; offsets and factors already broadcast to the tile."""
    offset = tl.where(positive, offset_positive, offset_negative)
    factor = tl.where(positive, factor_positive, tl.where(negative, factor_negative, 0.0))
    return tl.math.exp2(tl.where(positive | negative, logits, float("-inf")) - offset) * factor


@triton.jit
def grad_embeddings_kernel(
    embeddings, prototypes,
    pixel_ranges, pixel_words, prototype_words,
    row_ptr, row_split, row_entries, row_stats, grad_out,      # grad_out [n_pad, BLOCK_D] float32
    scale,
    SET_MODE: tl.constexpr, NUM_WORDS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    tile = tl.program_id(0)
    offs_n = tile.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    pixels = load_tile(embeddings, offs_n, BLOCK_D)
    own, member_lo, member_hi, positive_lo, positive_hi = load_row_ranges(pixel_ranges, offs_n)
    offset_negative = tl.load(row_stats + offs_n * 4)
    offset_positive = tl.load(row_stats + offs_n * 4 + 1)
    factor_negative = tl.load(row_stats + offs_n * 4 + 2)
    factor_positive = tl.load(row_stats + offs_n * 4 + 3)
    first, split, last = tl.load(row_ptr + tile), tl.load(row_split + tile), tl.load(row_ptr + tile + 1)
    accumulator = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)                  # dE tile

    # Pass 1: uniform tiles: one offset and one factor per row.
    for visit in range(first, split):
        entry = tl.load(row_entries + visit)
        offs_m = (entry >> 1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        prototype_tile = load_tile(prototypes, offs_m, BLOCK_D)
        similarity = dot(pixels, tl.trans(prototype_tile), IEEE)
        is_positive = (entry & 1) != 0
        offset = tl.where(is_positive, offset_positive, offset_negative)
        factor = tl.where(is_positive, factor_positive, factor_negative)
        grad = tl.math.exp2(similarity * scale - offset[:, None]) * factor[:, None]
        accumulator += dot(grad.to(prototype_tile.dtype), prototype_tile, IEEE)

    # Pass 2: masked tiles.
    for visit in range(split, last):
        offs_m = (tl.load(row_entries + visit) >> 1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        prototype_tile = load_tile(prototypes, offs_m, BLOCK_D)
        similarity = dot(pixels, tl.trans(prototype_tile), IEEE)
        positive, negative = tile_membership(offs_n, offs_m, own, member_lo, member_hi, positive_lo, positive_hi,
                                             pixel_words, prototype_words, SET_MODE, NUM_WORDS, False)
        grad = _masked_grad(similarity * scale, positive, negative, offset_negative[:, None],
                            offset_positive[:, None], factor_negative[:, None], factor_positive[:, None])
        accumulator += dot(grad.to(prototype_tile.dtype), prototype_tile, IEEE)
    tl.store(grad_out + offs_n[:, None] * BLOCK_D + tl.arange(0, BLOCK_D)[None, :], accumulator)


@triton.jit
def grad_prototypes_kernel(
    embeddings, prototypes,
    pixel_ranges, pixel_words, prototype_words,
    col_ptr, col_split, col_entries, row_stats, partial_out,   # partial_out [S, m_pad, BLOCK_D] float32
    scale, entries_per_split, m_pad,
    SET_MODE: tl.constexpr, NUM_WORDS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    tile = tl.program_id(0)
    split_index = tl.program_id(1)
    offs_m = tile.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    prototype_tile = load_tile(prototypes, offs_m, BLOCK_D)
    begin = tl.load(col_ptr + tile) + split_index * entries_per_split
    end = tl.minimum(begin + entries_per_split, tl.load(col_ptr + tile + 1))
    uniform_end = tl.maximum(tl.minimum(tl.load(col_split + tile), end), begin)
    accumulator = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)                  # dP tile

    # Pass 1: uniform tiles. The tile is [prototypes, pixels]: per-pixel stats broadcast along columns.
    for visit in range(begin, uniform_end):
        entry = tl.load(col_entries + visit)
        offs_n = (entry >> 1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        pixel_tile = load_tile(embeddings, offs_n, BLOCK_D)
        which = entry & 1                                                   # 1: the positive stats
        offset = tl.load(row_stats + offs_n * 4 + which)
        factor = tl.load(row_stats + offs_n * 4 + 2 + which)
        similarity_t = dot(prototype_tile, tl.trans(pixel_tile), IEEE)     # [BM, BN]
        grad_t = tl.math.exp2(similarity_t * scale - offset[None, :]) * factor[None, :]
        accumulator += dot(grad_t.to(pixel_tile.dtype), pixel_tile, IEEE)

    # Pass 2: masked tiles.
    for visit in range(uniform_end, end):
        offs_n = (tl.load(col_entries + visit) >> 1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        pixel_tile = load_tile(embeddings, offs_n, BLOCK_D)
        similarity_t = dot(prototype_tile, tl.trans(pixel_tile), IEEE)
        own, member_lo, member_hi, positive_lo, positive_hi = load_row_ranges(pixel_ranges, offs_n)
        positive, negative = tile_membership(offs_n, offs_m, own, member_lo, member_hi, positive_lo, positive_hi,
                                             pixel_words, prototype_words, SET_MODE, NUM_WORDS, True)
        grad_t = _masked_grad(similarity_t * scale, positive, negative,
                              tl.load(row_stats + offs_n * 4)[None, :], tl.load(row_stats + offs_n * 4 + 1)[None, :],
                              tl.load(row_stats + offs_n * 4 + 2)[None, :],
                              tl.load(row_stats + offs_n * 4 + 3)[None, :])
        accumulator += dot(grad_t.to(pixel_tile.dtype), pixel_tile, IEEE)
    tl.store(partial_out + (split_index.to(tl.int64) * m_pad + offs_m[:, None]) * BLOCK_D
             + tl.arange(0, BLOCK_D)[None, :], accumulator)


def launch_pixel_segment_grads(sorted_embeddings: torch.Tensor, sorted_prototypes: torch.Tensor, plan, config,
                               kappa: float, row_stats: torch.Tensor):
    """Gradients w.r.t. the sorted, padded embeddings and prototypes of sum_i g_i L(i) over the non-own
    segments, for kappa = 1 / log2 units (the caller multiplies by kappa and the upstream scale).
    row_stats [n_pad, 4] float32 (module docstring). Returns (dE [n_pad, BLOCK_D], dP [m_pad, BLOCK_D])
    float32."""
    n_pad, block_d = sorted_embeddings.shape
    m_pad = sorted_prototypes.shape[0]
    device = sorted_embeddings.device
    meta = (plan.pixel_ranges, plan.pixel_key, plan.prototype_key)
    flags = dict(SET_MODE=plan.set_mode, NUM_WORDS=plan.num_words, IEEE=ieee_dot(sorted_embeddings.dtype),
                 BLOCK_N=config.block_n, BLOCK_M=config.block_m, BLOCK_D=block_d)
    scale = kappa * LOG2E
    grad_embeddings = torch.empty(n_pad, block_d, device=device, dtype=torch.float32)
    grad_embeddings_kernel[(n_pad // config.block_n,)](
        sorted_embeddings, sorted_prototypes, *meta, plan.row_ptr, plan.row_split, plan.row_entries, row_stats,
        grad_embeddings, scale, **flags,
        num_warps=config.grad_embeddings.num_warps, num_stages=config.grad_embeddings.num_stages)

    visits = (plan.col_ptr[1:] - plan.col_ptr[:-1]).to(torch.int64)
    splits = max(1, triton.cdiv(int(visits.max()) if visits.numel() else 0, config.entries_per_split))
    partials = torch.empty(splits, m_pad, block_d, device=device, dtype=torch.float32)
    grad_prototypes_kernel[(m_pad // config.block_m, splits)](
        sorted_embeddings, sorted_prototypes, *meta, plan.col_ptr, plan.col_split, plan.col_entries, row_stats,
        partials, scale, config.entries_per_split, m_pad, **flags,
        num_warps=config.grad_prototypes.num_warps, num_stages=config.grad_prototypes.num_stages)
    return grad_embeddings, partials.sum(0)
