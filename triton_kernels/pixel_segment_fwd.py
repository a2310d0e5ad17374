"""Forward of the pixel-to-segment contrastive loss: per-pixel log-sum-exps.

A program owns one pixel tile of the plan (``spml_fast.ops.contrast_plan``)
and streams the prototype tiles its visit row names, like the
fused-attention forward. Per pixel and per set (S+, S-) it keeps a running
max and a sum, in log2 units (kappa * log2(e) folded into one multiply-add
before ``exp2``); each pair costs one exp, and a set's sum holds its own
max's term (1), so nothing underflows whatever kappa:

  pass 1, uniform tiles: every pair in S+ (or every pair in S-): no label
          loads, no masks; one set's max and sum change per tile;
  pass 2, excluding tiles: the same, less the pixel's own segment and the
          empty slots past its group (one column test per pair);
  pass 3, masked tiles: membership per pair (label / group / own segment /
          empty slots), each set's tile max apart, one exp per pair with the
          shift of the pair's set.

Stored per participating pixel, in its original row (``pixel_index``): the
natural-log lse of S+ and of S- (-inf when empty; a set's sum holds 1 for
its max, so "empty" is "sum < 1") and whether S+ is not empty.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import (LN2, LOG2E, dot, ieee_dot, load_row_ranges, load_tile, tile_membership, tile_partners,
                    visit_bounds)


@triton.jit
def _merge_one_set(logits, is_positive, max_positive, sum_positive, max_negative, sum_negative):
    """Add a tile whose pairs are all in one set (``is_positive``, a scalar) to that set's running max
    and sum; logits [BN, BM] float32 log2 units, -inf where excluded."""
    running = tl.where(is_positive, max_positive, max_negative)
    new_max = tl.maximum(running, tl.max(logits, axis=1))
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)            # all excluded: no -inf - -inf
    total = tl.where(is_positive, sum_positive, sum_negative) * tl.math.exp2(running - shift) \
        + tl.sum(tl.math.exp2(logits - shift[:, None]), axis=1)
    return (tl.where(is_positive, new_max, max_positive), tl.where(is_positive, total, sum_positive),
            tl.where(is_positive, max_negative, new_max), tl.where(is_positive, sum_negative, total))


@triton.jit
def pixel_segment_lse_kernel(
    embeddings, prototypes,                          # [n_pad, BLOCK_D], [m_pad, BLOCK_D], sorted, zero-padded
    pixel_ranges, pixel_words, prototype_words,      # the plan's membership data (utils.tile_membership)
    visit_entries, visit_counts, tiles_m,            # the plan's visit row of each pixel tile
    pixel_index,                                     # [n_pad] int32: original row of each slot (-1: none)
    lse_positive_out, lse_negative_out, has_positive_out,   # [N] float32 each
    scale,                                           # kappa * log2(e)
    SET_MODE: tl.constexpr, NUM_WORDS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    tile = tl.program_id(0)
    offs_n = tile.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    pixels = load_tile(embeddings, offs_n, BLOCK_D)
    own, lo, width, positive_lo, positive_width = load_row_ranges(pixel_ranges, offs_n)
    max_positive = tl.full([BLOCK_N], float("-inf"), tl.float32)
    max_negative = tl.full([BLOCK_N], float("-inf"), tl.float32)
    sum_positive = tl.zeros([BLOCK_N], tl.float32)
    sum_negative = tl.zeros([BLOCK_N], tl.float32)
    entries, uniform_end, excluding_end, masked_end = visit_bounds(visit_entries, visit_counts, tile, tiles_m)

    # Pass 1: uniform tiles.
    for visit in range(0, uniform_end):
        entry = tl.load(entries + visit)
        offs_m = (entry >> 1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        logits = dot(pixels, tl.trans(load_tile(prototypes, offs_m, BLOCK_D)), IEEE) * scale   # [BN, BM]
        max_positive, sum_positive, max_negative, sum_negative = _merge_one_set(
            logits, (entry & 1) != 0, max_positive, sum_positive, max_negative, sum_negative)

    # Pass 2: uniform tiles less the own segment and the empty slots.
    for visit in range(uniform_end, excluding_end):
        entry = tl.load(entries + visit)
        offs_m = (entry >> 1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        similarity = dot(pixels, tl.trans(load_tile(prototypes, offs_m, BLOCK_D)), IEEE)
        logits = tl.where(tile_partners(offs_m, own, lo, width, False), similarity * scale, float("-inf"))
        max_positive, sum_positive, max_negative, sum_negative = _merge_one_set(
            logits, (entry & 1) != 0, max_positive, sum_positive, max_negative, sum_negative)

    # Pass 3: masked tiles.
    for visit in range(excluding_end, masked_end):
        offs_m = (tl.load(entries + visit) >> 1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        logits = dot(pixels, tl.trans(load_tile(prototypes, offs_m, BLOCK_D)), IEEE) * scale
        positive, negative = tile_membership(offs_n, offs_m, own, lo, width, positive_lo, positive_width,
                                             pixel_words, prototype_words, SET_MODE, NUM_WORDS, False)
        logits_positive = tl.where(positive, logits, float("-inf"))
        logits_negative = tl.where(negative, logits, float("-inf"))
        new_positive = tl.maximum(max_positive, tl.max(logits_positive, axis=1))
        new_negative = tl.maximum(max_negative, tl.max(logits_negative, axis=1))
        shift_positive = tl.where(new_positive == float("-inf"), 0.0, new_positive)
        shift_negative = tl.where(new_negative == float("-inf"), 0.0, new_negative)
        exps = tl.math.exp2(tl.where(positive, logits_positive - shift_positive[:, None],
                                     logits_negative - shift_negative[:, None]))        # 0 off both sets
        sum_positive = sum_positive * tl.math.exp2(max_positive - shift_positive) \
            + tl.sum(tl.where(positive, exps, 0.0), axis=1)
        sum_negative = sum_negative * tl.math.exp2(max_negative - shift_negative) \
            + tl.sum(tl.where(positive, 0.0, exps), axis=1)
        max_positive, max_negative = new_positive, new_negative

    index = tl.load(pixel_index + offs_n)
    stored = index >= 0
    index = index.to(tl.int64)
    has_positive = sum_positive >= 1.0
    tl.store(lse_positive_out + index, tl.where(has_positive, (max_positive + tl.log2(tl.maximum(sum_positive, 1.0)))
                                                * LN2, float("-inf")), mask=stored)
    tl.store(lse_negative_out + index, tl.where(sum_negative >= 1.0, (max_negative + tl.log2(tl.maximum(
        sum_negative, 1.0))) * LN2, float("-inf")), mask=stored)
    tl.store(has_positive_out + index, has_positive.to(tl.float32), mask=stored)


def launch_pixel_segment_lse(sorted_embeddings: torch.Tensor, sorted_prototypes: torch.Tensor, plan, config,
                             kappa: float) -> torch.Tensor:
    """sorted_embeddings [n_pad, BLOCK_D], sorted_prototypes [m_pad, BLOCK_D] (``ContrastPlan`` slots,
    zero-padded, same float dtype); config: ``configs.ContrastConfig``.
    Returns [3, N] float32: lse over S+ and over S- less the own segment (natural log, -inf when empty)
    and 1.0 where S+ less it is not empty; 0 for pixels that do not participate."""
    block_d = sorted_embeddings.shape[1]
    outputs = torch.zeros(3, plan.pixel_order.shape[0], device=sorted_embeddings.device, dtype=torch.float32)
    pixel_segment_lse_kernel[(plan.tiles_n,)](
        sorted_embeddings, sorted_prototypes, plan.pixel_ranges, plan.pixel_words, plan.prototype_words,
        plan.row_entries, plan.row_counts, plan.tiles_m, plan.pixel_index, outputs[0], outputs[1], outputs[2],
        kappa * LOG2E,
        SET_MODE=plan.set_mode, NUM_WORDS=plan.num_words, IEEE=ieee_dot(sorted_embeddings.dtype),
        BLOCK_N=config.block_n, BLOCK_M=config.block_m, BLOCK_D=block_d,
        num_warps=config.forward.num_warps, num_stages=config.forward.num_stages)
    return outputs
