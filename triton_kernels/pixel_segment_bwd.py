"""Backward of the pixel-to-segment contrastive loss, by recomputation.

dL/dlogit for a pair (unit upstream gradient g, own segment excluded) is
  negative pair: exp(l - lse_all)
  positive pair: exp(l - lse_all) - exp(l - lse_positive)
               = exp(l - lse_positive) * (exp(lse_positive - lse_all) - 1)
so each pair costs one exp2 with a per-row offset and a per-row factor,
both bounded (exponent <= 0, factor in [-1, 0]): nothing overflows, for any
kappa. The dE kernel derives them for the pixels of its tile (``_row_stats``)
from the forward's lse over S+ and over S u S- and the upstream gradient,
read in the pixels' original rows through the plan's ``pixel_index``, and
stores them per slot ([n_pad, ROW_STATS] float32) for the dP kernel, which
runs after it: (offset S+, factor S+, offset S-, factor S-, offset S+ less
S-, factor S+ less S-) in log2 units, the upstream gradient scaled to
[-1, 1] (by ``grad_scale``, its largest magnitude, so that fp16 tiles of G
keep their precision) folded into the factors; padded and non-participating
rows are 0. The outputs are scaled back by kappa * grad_scale: dE in the
pixels' rows, dP as [S, m_pad, BLOCK_D] partials.

Two kernels rather than one kernel with atomics:
- ``grad_embeddings_kernel``: a program per pixel tile walks its visit list
  (as the forward) and accumulates dE = G @ P in registers;
- ``grad_prototypes_kernel``: a program per (prototype tile, split of its
  visit row) computes the transposed tile G^T = (P E^T) directly, like the
  fused-attention dK/dV kernel, and accumulates dP = G^T @ E; S splits
  (fixed from the shapes), each taking 1/S of its column's visits, write
  float32 partials [S, m_pad, BLOCK_D], summed afterwards in split order.
Each kernel has the forward's four passes: uniform tiles (one offset and
factor per row), excluding tiles (the same, own segment and empty slots
zeroed), column-masked tiles (membership per segment: the offset and factor
blended by a per-segment weight, the exponent capped at 0 by a per-segment
ceiling, -inf off the partners) and pair-masked tiles (membership per
pair). The column-masked pass has no per-pair test for the own segment: it
keeps its term, which the cap bounds (its lse does not hold it, so its
exponent may exceed 0), and the dE kernel computes that term in float32 and
takes it out of the own segment's coefficient: dE is whole, and the caller
adds coefficient x e to each own segment's dP row with the rest of the own
segment's gradient.
Atomics on dP would make float32 sums depend on scheduling order; with two
kernels and a fixed visit order training stays bit-reproducible, which
resuming a killed run exactly relies on.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import (LN2, LOG2E, LOG2E_IN_KERNEL, _in_range, _per_pixel, column_members, dot, ieee_dot,
                    load_row_ranges, load_tile, own_membership, own_prototype_rows, own_similarity, tile_partners,
                    tile_positives, visit_bounds)


# per slot, for dP: offset and factor of S+, of S-, and their differences (S+ less S-)
ROW_STATS: tl.constexpr = tl.constexpr(6)


@triton.jit
def _one_set_grad(logits, is_positive, offset_negative, offset_positive, factor_negative, factor_positive,
                  TRANSPOSED: tl.constexpr):
    """G of a tile whose pairs are all in one set (``is_positive``, a scalar): one offset and one factor
    per pixel; logits -inf where excluded."""
    offset = _per_pixel(tl.where(is_positive, offset_positive, offset_negative), TRANSPOSED)
    factor = _per_pixel(tl.where(is_positive, factor_positive, factor_negative), TRANSPOSED)
    return tl.math.exp2(logits - offset) * factor


@triton.jit
def _masked_grad(logits, positive, offset_negative, offset_positive, factor_negative, factor_positive,
                 TRANSPOSED: tl.constexpr):
    """G of a masked tile: logits -inf off the partners, ``positive`` the positives among the rest;
    per-pixel offsets and factors [pixels]."""
    offset = tl.where(positive, _per_pixel(offset_positive, TRANSPOSED), _per_pixel(offset_negative, TRANSPOSED))
    factor = tl.where(positive, _per_pixel(factor_positive, TRANSPOSED), _per_pixel(factor_negative, TRANSPOSED))
    return tl.math.exp2(logits - offset) * factor


@triton.jit
def _column_grad(similarity, scale, partner, positive, offset_negative, offset_delta, factor_negative, factor_delta,
                 TRANSPOSED: tl.constexpr):
    """G of a column-masked tile from the similarities ([pixels, segments], or transposed): per segment
    ``partner`` and ``positive`` ([BM] bool), per pixel the S- offset and factor and their S+ less S-
    differences. The offset and factor are blended by the positive weight (two FFMAs per pair instead of
    a compare and two selects), and the exponent is capped at 0 by a per-segment ceiling (0 on partners,
    -inf elsewhere: one FMNMX both excludes the non-partners and bounds the own segment's term, which the
    loop keeps and whose lse does not hold it)."""
    weight = _per_segment(tl.where(positive, 1.0, 0.0), TRANSPOSED)
    ceiling = _per_segment(tl.where(partner, 0.0, float("-inf")), TRANSPOSED)
    offset = _per_pixel(offset_negative, TRANSPOSED) + weight * _per_pixel(offset_delta, TRANSPOSED)
    factor = _per_pixel(factor_negative, TRANSPOSED) + weight * _per_pixel(factor_delta, TRANSPOSED)
    return tl.math.exp2(tl.minimum(similarity * scale - offset, ceiling)) * factor


@triton.jit
def _per_segment(values, TRANSPOSED: tl.constexpr):
    """A segment vector broadcast along the tile's pixel axis."""
    if TRANSPOSED:
        return values[:, None]
    else:
        return values[None, :]


@triton.jit
def _expm1(x):
    """exp(x) - 1 for x <= 0 without cancellation near 0 (Taylor to x^7 for |x| < 1/4: relative error
    below 1e-8; float32 exp beyond)."""
    series = x * (1.0 + x * (0.5 + x * (1.0 / 6 + x * (1.0 / 24 + x * (1.0 / 120 + x * (1.0 / 720
                                                                                         + x / 5040))))))
    return tl.where(x > -0.25, series, tl.math.exp(x) - 1.0)


@triton.jit
def _grad_scale(grad_scale):
    """The upstream gradient's largest magnitude ([1] float32), at least the smallest normal float."""
    return tl.maximum(tl.load(grad_scale), 1.1754943508222875e-38)


@triton.jit
def _row_stats(pixel_index, lse_all, lse_positive, pixel_grad, grad_scale, offs_n):
    """(offset S-, offset S+, factor S-, factor S+) of a tile's pixels, [pixels] float32 each (module
    docstring); 0 at padded and non-participating slots."""
    index = tl.load(pixel_index + offs_n)
    used = index >= 0
    index = index.to(tl.int64)
    offset_all = tl.load(lse_all + index, mask=used, other=0.0) * LOG2E_IN_KERNEL
    offset_positive = tl.load(lse_positive + index, mask=used, other=0.0) * LOG2E_IN_KERNEL
    upstream = tl.load(pixel_grad + index, mask=used, other=0.0) / _grad_scale(grad_scale)
    # positive pairs: exp2(l - lse_positive) * (exp(lse_positive - lse_all) - 1), the factor in [-1, 0]
    factor_positive = upstream * _expm1(tl.minimum(offset_positive - offset_all, 0.0) * LN2)
    return offset_all, offset_positive, upstream, factor_positive


@triton.jit
def grad_embeddings_kernel(
    embeddings, prototypes,
    pixel_ranges, pixel_words, prototype_words, prototype_keys,
    visit_entries, visit_counts, tiles_m,
    pixel_index, lse_all, lse_positive, pixel_grad, grad_scale,    # [n_pad] int64, [N] float32 x 3, [1]
    own_grad,                                      # [N] float32: kappa dL/d(own logit) (own segment in S+)
    grad_out, dim, row_stats,                      # [N, dim] float32; out: [n_pad, ROW_STATS] float32
    own_out,                                       # [N] float32: the own segment's coefficient (below)
    own_prototypes, own_stride_row, own_stride_col, segment,        # the caller's [M, dim] prototypes, [N] int64
    scale, kappa,
    SET_MODE: tl.constexpr, NUM_WORDS: tl.constexpr, IEEE: tl.constexpr, COLUMN_MASKED: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    tile = tl.program_id(0)
    offs_n = tile.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    pixels = load_tile(embeddings, offs_n, BLOCK_D)
    own, lo, width, positive_lo, positive_width = load_row_ranges(pixel_ranges, offs_n)
    offset_negative, offset_positive, factor_negative, factor_positive = _row_stats(
        pixel_index, lse_all, lse_positive, pixel_grad, grad_scale, offs_n)
    offset_delta, factor_delta = offset_positive - offset_negative, factor_positive - factor_negative
    stats = row_stats + offs_n * ROW_STATS
    tl.store(stats, offset_positive)
    tl.store(stats + 1, factor_positive)
    tl.store(stats + 2, offset_negative)
    tl.store(stats + 3, factor_negative)
    tl.store(stats + 4, offset_delta)
    tl.store(stats + 5, factor_delta)
    entries, uniform_end, excluding_end, columns_end, masked_end = visit_bounds(visit_entries, visit_counts, tile,
                                                                               tiles_m)
    accumulator = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)                  # dE tile

    # Pass 1: uniform tiles: one offset and one factor per row.
    for visit in range(0, uniform_end):
        entry = tl.load(entries + visit)
        offs_m = (entry >> 1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        prototype_tile = load_tile(prototypes, offs_m, BLOCK_D)
        logits = dot(pixels, tl.trans(prototype_tile), IEEE) * scale
        grad = _one_set_grad(logits, (entry & 1) != 0, offset_negative, offset_positive, factor_negative,
                             factor_positive, False)
        accumulator += dot(grad.to(prototype_tile.dtype), prototype_tile, IEEE)

    # Pass 2: uniform tiles less the own segment and the empty slots.
    for visit in range(uniform_end, excluding_end):
        entry = tl.load(entries + visit)
        offs_m = (entry >> 1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        prototype_tile = load_tile(prototypes, offs_m, BLOCK_D)
        similarity = dot(pixels, tl.trans(prototype_tile), IEEE)
        logits = tl.where(tile_partners(offs_m, own, lo, width, False), similarity * scale, float("-inf"))
        grad = _one_set_grad(logits, (entry & 1) != 0, offset_negative, offset_positive, factor_negative,
                             factor_positive, False)
        accumulator += dot(grad.to(prototype_tile.dtype), prototype_tile, IEEE)

    # Pass 3: masked tiles of a pixel tile of one type: membership per column. The own segment is not
    # taken out here (a per-pair test); its term is computed below and taken out by the caller.
    own_visited = tl.zeros([BLOCK_N], tl.int32)
    if COLUMN_MASKED:
        for visit in range(excluding_end, columns_end):
            start = (tl.load(entries + visit) >> 1) * BLOCK_M
            offs_m = start.to(tl.int64) + tl.arange(0, BLOCK_M)
            prototype_tile = load_tile(prototypes, offs_m, BLOCK_D)
            similarity = dot(pixels, tl.trans(prototype_tile), IEEE)
            partner, positive = column_members(start, tile.to(tl.int64) * BLOCK_N, pixel_ranges, pixel_words,
                                               prototype_words, prototype_keys, SET_MODE, NUM_WORDS, BLOCK_M)
            grad = _column_grad(similarity, scale, partner, positive, offset_negative, offset_delta,
                                factor_negative, factor_delta, False)
            accumulator += dot(grad.to(prototype_tile.dtype), prototype_tile, IEEE)
            own_visited |= _in_range(own, start, BLOCK_M).to(tl.int32)

    # Pass 4: masked tiles of a pixel tile of several types: membership per pair.
    for visit in range(columns_end, masked_end):
        offs_m = (tl.load(entries + visit) >> 1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        prototype_tile = load_tile(prototypes, offs_m, BLOCK_D)
        similarity = dot(pixels, tl.trans(prototype_tile), IEEE)
        logits = tl.where(tile_partners(offs_m, own, lo, width, False), similarity * scale, float("-inf"))
        positive = tile_positives(offs_n, offs_m, positive_lo, positive_width, pixel_words, prototype_words,
                                  SET_MODE, NUM_WORDS, False)
        grad = _masked_grad(logits, positive, offset_negative, offset_positive, factor_negative, factor_positive,
                            False)
        accumulator += dot(grad.to(prototype_tile.dtype), prototype_tile, IEEE)
    index = tl.load(pixel_index + offs_n)
    stored = index >= 0
    index = index.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    out_scale = _grad_scale(grad_scale) * kappa
    tl.store(grad_out + index[:, None] * dim + offs_d[None, :], accumulator * out_scale,
             mask=stored[:, None] & (offs_d < dim)[None, :])
    # The own segment's coefficient c (dE += c p_own here, dP_own += c e by the caller): its gradient where it
    # is in S+ (g * own_grad), less its term where pass 3 took it in (pass 3's membership, in float32).
    own_coefficient = tl.load(pixel_grad + index, mask=stored, other=0.0) * tl.load(own_grad + index, mask=stored,
                                                                                    other=0.0)
    if COLUMN_MASKED:
        own_partner, own_positive = own_membership(own, positive_lo, positive_width, pixel_words, prototype_words,
                                                   offs_n, lo, width, SET_MODE, NUM_WORDS)
        taken = (own_visited != 0) & own_partner
        own_logit = own_similarity(embeddings, offs_n, own_prototypes, own_stride_row, own_stride_col, segment,
                                   index, taken, dim, BLOCK_D) * scale
        weight = own_positive.to(tl.float32)
        own_term = tl.math.exp2(tl.minimum(own_logit - (offset_negative + weight * offset_delta), 0.0)) * (
            factor_negative + weight * factor_delta)
        own_coefficient -= tl.where(taken, own_term * out_scale, 0.0)
    tl.store(own_out + index, own_coefficient, mask=stored)
    # dE += c p_own, 16 columns at a time over the rows just stored (a barrier: other threads wrote them),
    # so that no second [BLOCK_N, BLOCK_D] tile is live next to the accumulator. (Without pass 3 the
    # launcher adds it: at D = 128 even this epilogue spills.)
    if COLUMN_MASKED:
        tl.debug_barrier()
        for first in range(0, BLOCK_D, 16):             # a loop, not unrolled: one chunk's registers at a time
            columns = first + tl.arange(0, 16)
            written = grad_out + index[:, None] * dim + columns[None, :]
            in_row = stored[:, None] & (columns < dim)[None, :]
            tl.store(written, tl.load(written, mask=in_row, other=0.0) + own_coefficient[:, None] * own_prototype_rows(
                own_prototypes, own_stride_row, own_stride_col, segment, index, stored, columns, dim), mask=in_row)


@triton.jit
def grad_prototypes_kernel(
    embeddings, prototypes,
    pixel_ranges, pixel_words, prototype_words, prototype_keys,
    visit_entries, visit_counts, tiles_n,
    row_stats, grad_scale,                                          # from grad_embeddings_kernel; [1]
    partial_out,                                                    # [S, m_pad, BLOCK_D] float32
    scale, kappa, m_pad,
    SET_MODE: tl.constexpr, NUM_WORDS: tl.constexpr, IEEE: tl.constexpr, COLUMN_MASKED: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    tile = tl.program_id(0)
    split_index = tl.program_id(1)
    offs_m = tile.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    prototype_tile = load_tile(prototypes, offs_m, BLOCK_D)
    entries, uniform_end, excluding_end, columns_end, masked_end = visit_bounds(visit_entries, visit_counts, tile,
                                                                               tiles_n)
    share = tl.cdiv(masked_end, tl.num_programs(1))                     # this split: visits [begin, end)
    begin = split_index * share
    end = tl.minimum(begin + share, masked_end)
    accumulator = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)                  # dP tile

    # Pass 1: uniform tiles. The tile is [prototypes, pixels]: per-pixel stats broadcast along columns.
    for visit in range(begin, tl.minimum(uniform_end, end)):
        entry = tl.load(entries + visit)
        offs_n = (entry >> 1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        pixel_tile = load_tile(embeddings, offs_n, BLOCK_D)
        stats = row_stats + offs_n * ROW_STATS + 2 - 2 * (entry & 1)               # the tile's set: S+ or S-
        offset, factor = tl.load(stats), tl.load(stats + 1)
        logits_t = dot(prototype_tile, tl.trans(pixel_tile), IEEE) * scale     # [BM, BN]
        grad_t = tl.math.exp2(logits_t - offset[None, :]) * factor[None, :]
        accumulator += dot(grad_t.to(pixel_tile.dtype), pixel_tile, IEEE)

    # Pass 2: uniform tiles less the own segment and the empty slots.
    for visit in range(tl.maximum(begin, uniform_end), tl.minimum(excluding_end, end)):
        entry = tl.load(entries + visit)
        offs_n = (entry >> 1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        pixel_tile = load_tile(embeddings, offs_n, BLOCK_D)
        stats = row_stats + offs_n * ROW_STATS + 2 - 2 * (entry & 1)
        offset, factor = tl.load(stats), tl.load(stats + 1)
        own, lo, width, positive_lo, positive_width = load_row_ranges(pixel_ranges, offs_n)
        similarity_t = dot(prototype_tile, tl.trans(pixel_tile), IEEE)
        logits_t = tl.where(tile_partners(offs_m, own, lo, width, True), similarity_t * scale, float("-inf"))
        grad_t = tl.math.exp2(logits_t - offset[None, :]) * factor[None, :]
        accumulator += dot(grad_t.to(pixel_tile.dtype), pixel_tile, IEEE)

    # Pass 3: masked tiles of pixel tiles of one type: membership per prototype row; the own segments' terms
    # are left in (the dE kernel computes them, the caller takes them out).
    if COLUMN_MASKED:
        for visit in range(tl.maximum(begin, excluding_end), tl.minimum(columns_end, end)):
            pixel_start = (tl.load(entries + visit) >> 1).to(tl.int64) * BLOCK_N
            offs_n = pixel_start + tl.arange(0, BLOCK_N)
            pixel_tile = load_tile(embeddings, offs_n, BLOCK_D)
            stats = tl.load(row_stats + offs_n[:, None] * ROW_STATS + 2 + tl.arange(0, 4)[None, :])   # [BN, 4]
            negative_stats, delta_stats = tl.split(tl.reshape(stats, [BLOCK_N, 2, 2]).permute(0, 2, 1))
            offset_negative, factor_negative = tl.split(negative_stats)
            offset_delta, factor_delta = tl.split(delta_stats)
            partner, positive = column_members(tile * BLOCK_M, pixel_start, pixel_ranges, pixel_words, prototype_words,
                                               prototype_keys, SET_MODE, NUM_WORDS, BLOCK_M)
            similarity_t = dot(prototype_tile, tl.trans(pixel_tile), IEEE)
            grad_t = _column_grad(similarity_t, scale, partner, positive, offset_negative, offset_delta,
                                  factor_negative, factor_delta, True)
            accumulator += dot(grad_t.to(pixel_tile.dtype), pixel_tile, IEEE)

    # Pass 4: masked tiles of pixel tiles of several types: membership per pair.
    for visit in range(tl.maximum(begin, columns_end), end):
        offs_n = (tl.load(entries + visit) >> 1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        pixel_tile = load_tile(embeddings, offs_n, BLOCK_D)
        stats = row_stats + offs_n * ROW_STATS
        offset_positive, factor_positive = tl.load(stats), tl.load(stats + 1)
        offset_negative, factor_negative = tl.load(stats + 2), tl.load(stats + 3)
        own, lo, width, positive_lo, positive_width = load_row_ranges(pixel_ranges, offs_n)
        similarity_t = dot(prototype_tile, tl.trans(pixel_tile), IEEE)
        logits_t = tl.where(tile_partners(offs_m, own, lo, width, True), similarity_t * scale, float("-inf"))
        positive = tile_positives(offs_n, offs_m, positive_lo, positive_width, pixel_words, prototype_words,
                                  SET_MODE, NUM_WORDS, True)
        grad_t = _masked_grad(logits_t, positive, offset_negative, offset_positive, factor_negative,
                              factor_positive, True)
        accumulator += dot(grad_t.to(pixel_tile.dtype), pixel_tile, IEEE)
    tl.store(partial_out + (split_index.to(tl.int64) * m_pad + offs_m[:, None]) * BLOCK_D
             + tl.arange(0, BLOCK_D)[None, :], accumulator * (_grad_scale(grad_scale) * kappa))


def prototype_splits(tiles_n: int, tiles_m: int, config) -> int:
    """Programs per prototype tile of the dP kernel, from the shapes only (the same split, hence the same
    float32 sums, in every call of a shape): about ``config.dp_programs`` programs in all, each with at
    least ``config.entries_per_split`` pixel tiles when the column is dense."""
    wanted = -(-config.dp_programs // max(1, tiles_m))
    return max(1, min(wanted, -(-tiles_n // config.entries_per_split)))


def launch_pixel_segment_grads(sorted_embeddings: torch.Tensor, sorted_prototypes: torch.Tensor,
                               prototypes: torch.Tensor, segment: torch.Tensor, plan, config, kappa: float,
                               lse_all: torch.Tensor, lse_positive: torch.Tensor, pixel_grad: torch.Tensor,
                               own_grad: torch.Tensor):
    """Gradients of sum_i g_i L(i). sorted_* [n_pad | m_pad, BLOCK_D] (the plan's slots); prototypes [M, D]
    and segment [N] as the caller has them (the own segments' terms); lse_all,
    lse_positive, pixel_grad, own_grad [N] float32 (g = 0 where the pixel does not take part; own_grad:
    kappa dL/d(own logit)). Returns float32 (dE [N, dim], dP [m_pad, BLOCK_D] in the slots' order, own
    [N]): dE whole; dP over the other segments, except that a column-masked tile leaves the own segment's
    term in; ``own`` is the own segment's coefficient, g * own_grad less that term, for the caller to
    complete dP (dP_own += own * e)."""
    block_d = sorted_embeddings.shape[1]
    m_pad = sorted_prototypes.shape[0]
    device = sorted_embeddings.device
    grad_scale = pixel_grad.abs().amax(0, keepdim=True)               # [1]; the kernels keep it above 0
    stats = (plan.pixel_index, lse_all, lse_positive, pixel_grad, grad_scale, own_grad)
    meta = (plan.pixel_ranges, plan.pixel_words, plan.prototype_words, plan.prototype_keys)
    flags = dict(SET_MODE=plan.set_mode, NUM_WORDS=plan.num_words, IEEE=ieee_dot(sorted_embeddings.dtype),
                 COLUMN_MASKED=config.column_masked, BLOCK_N=config.block_n, BLOCK_M=config.block_m,
                 BLOCK_D=block_d)
    scale = kappa * LOG2E
    dim = prototypes.shape[1]
    grad_embeddings = torch.zeros(pixel_grad.shape[0], dim, device=device, dtype=torch.float32)
    row_stats = torch.empty(plan.n_pad, ROW_STATS.value, device=device, dtype=torch.float32)
    own = torch.zeros(pixel_grad.shape[0], device=device, dtype=torch.float32)
    grad_embeddings_kernel[(plan.tiles_n,)](
        sorted_embeddings, sorted_prototypes, *meta, plan.row_entries, plan.row_counts, plan.tiles_m, *stats,
        grad_embeddings, dim, row_stats, own, prototypes, prototypes.stride(0), prototypes.stride(1), segment,
        scale, kappa, **flags,
        num_warps=config.grad_embeddings.num_warps, num_stages=config.grad_embeddings.num_stages)
    splits = prototype_splits(plan.tiles_n, plan.tiles_m, config)
    partials = torch.empty(splits, m_pad, block_d, device=device, dtype=torch.float32)
    grad_prototypes_kernel[(plan.tiles_m, splits)](
        sorted_embeddings, sorted_prototypes, *meta, plan.col_entries, plan.col_counts, plan.tiles_n, row_stats,
        grad_scale, partials, scale, kappa, m_pad, **flags,
        num_warps=config.grad_prototypes.num_warps, num_stages=config.grad_prototypes.num_stages)
    if not config.column_masked:         # that dE kernel has no registers for its own-term epilogue
        grad_embeddings.addcmul_(own[:, None], prototypes.index_select(0, segment).float())
    return grad_embeddings, partials.sum(0), own
