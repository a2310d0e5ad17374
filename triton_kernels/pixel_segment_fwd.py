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
  pass 3, column-masked tiles (the pixel tile holds one type: the plan pads
          each type's run of pixels to a tile boundary): membership per
          segment (made once per thread from the slots' keys and broadcast
          through shared memory), the own segment per pair; no max: the
          shift is a bound on the row's logits, kappa |e| max|p|, and two
          weighted sums per pair keep the sets apart;
  pass 4, pair-masked tiles (several types in the pixel tile): membership
          per pair (label / group / own segment / empty slots), one max per
          tile shared by both sets, one exp per pair; each set's tile sum
          then joins its running max and sum.

A shared max or bound can leave a set's tile sum at (or near) zero when the
set lies ~100 log2 units below it (kappa * similarity gaps above ~70: never
with unit vectors and kappa < 35). The fast launch flags such rows (the set
has members in the tile, its tile sum < 2^-100) in ``flags``; a second launch
with ``EXACT`` (each set its own max: two max reductions per pair; it takes
the column-masked tiles in pass 4) recomputes the flagged rows, its programs
without a flagged row return at once. No read-back: both launches are
always made.

Stored per participating pixel, in its original row (``pixel_index``): the
natural-log lse of S+ and of S- (-inf when empty), whether S+ is not empty,
and the own segment's logit (float32, from the same copies).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import (LN2, LOG2E, _in_range, bitwise_and, bitwise_or, column_members, dot, ieee_dot, load_row_ranges,
                    load_tile, own_membership, own_similarity, tile_partners, tile_positives, visit_bounds)

LAUNCHES = (False, True)          # EXACT of the two launches (tests take the second away to see it work)
LOST_BELOW: tl.constexpr = tl.constexpr(2.0 ** -100)   # a set's tile sum under the shared shift: flag the row


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
def _merge_two_sets(logits, positive, max_positive, sum_positive, max_negative, sum_negative):
    """The exact launch's masked tiles: each set its own max (two max reductions per pair), so that neither
    set's sum can underflow under the other's max. logits [BN, BM] float32 log2 units, -inf off the
    partners; positive [BN, BM] bool."""
    logits_positive = tl.where(positive, logits, float("-inf"))
    logits_negative = tl.where(positive, float("-inf"), logits)
    new_positive = tl.maximum(max_positive, tl.max(logits_positive, axis=1))
    new_negative = tl.maximum(max_negative, tl.max(logits_negative, axis=1))
    shift_positive = tl.where(new_positive == float("-inf"), 0.0, new_positive)
    shift_negative = tl.where(new_negative == float("-inf"), 0.0, new_negative)
    exps = tl.math.exp2(tl.where(positive, logits_positive - shift_positive[:, None],
                                 logits_negative - shift_negative[:, None]))    # 0 off the partners
    sum_positive = sum_positive * tl.math.exp2(max_positive - shift_positive) \
        + tl.sum(tl.where(positive, exps, 0.0), axis=1)
    sum_negative = sum_negative * tl.math.exp2(max_negative - shift_negative) \
        + tl.sum(tl.where(positive, 0.0, exps), axis=1)
    return new_positive, sum_positive, new_negative, sum_negative


@triton.jit
def _merge_tile_sum(running_max, running_sum, tile_shift, tile_sum):
    """Add a set's tile sum (relative to ``tile_shift``, [BN]) to its running max and sum."""
    new_max = tl.where(tile_sum > 0, tl.maximum(running_max, tile_shift), running_max)
    safe = tl.where(new_max == float("-inf"), 0.0, new_max)
    return new_max, running_sum * tl.math.exp2(running_max - safe) + tile_sum * tl.math.exp2(
        tl.where(tile_sum > 0, tile_shift - safe, float("-inf")))


@triton.jit
def _members_in_tile(offs_m, offs_n, lo, width, positive_lo, positive_width, prototype_words, pixel_words,
                     SET_MODE: tl.constexpr, NUM_WORDS: tl.constexpr, BLOCK_M: tl.constexpr):
    """Per pixel of a masked tile, whether S+ and S- may have members there ([BN] bool each), from the
    ranges (and, in set mode, the OR and AND of the tile's class-set words): conservative."""
    start = tl.min(offs_m, axis=0).to(tl.int32)
    end = start + BLOCK_M
    hi = lo + width.to(tl.int32)
    partners = tl.minimum(hi, end) - tl.maximum(lo, start)
    if SET_MODE:
        shares_any = tl.zeros_like(lo) != 0
        shares_all = tl.zeros_like(lo) != 0
        for word in tl.static_range(NUM_WORDS):
            words = tl.load(prototype_words + offs_m * NUM_WORDS + word)
            row_words = tl.load(pixel_words + offs_n * NUM_WORDS + word)
            shares_any = shares_any | ((row_words & tl.reduce(words, 0, bitwise_or)) != 0)
            shares_all = shares_all | ((row_words & tl.reduce(words, 0, bitwise_and)) != 0)
        return (partners > 0) & shares_any, (partners > 0) & ~shares_all
    else:
        positive_hi = positive_lo + positive_width.to(tl.int32)
        positives = tl.maximum(tl.minimum(positive_hi, end) - tl.maximum(positive_lo, start), 0)
        return positives > 0, tl.maximum(partners, 0) > positives


@triton.jit
def pixel_segment_lse_kernel(
    embeddings, prototypes,                          # [n_pad, BLOCK_D], [m_pad, BLOCK_D], sorted, zero-padded
    pixel_ranges, pixel_words, prototype_words, prototype_keys,   # the plan's membership data (utils)
    visit_entries, visit_counts, tiles_m,            # the plan's visit row of each pixel tile
    pixel_index,                                     # [n_pad] int64: original row of each slot (-1: none)
    outputs, num_pixels,                             # [4, N] float32: lse S+, lse S-, S+ not empty, own logit
    flags,                                           # [n_pad] int32: the fast launch writes, the exact reads
    scale, prototype_norm,                           # kappa * log2(e); [1] float32: the largest |p|
    own_prototypes, own_stride_row, own_stride_col, segment, dim,   # the caller's [M, dim] prototypes, [N] int64
    SET_MODE: tl.constexpr, NUM_WORDS: tl.constexpr, IEEE: tl.constexpr, EXACT: tl.constexpr,
    COLUMN_MASKED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    tile = tl.program_id(0)
    offs_n = tile.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    if EXACT:
        flagged = tl.load(flags + offs_n) != 0
        if tl.max(flagged.to(tl.int32), axis=0) == 0:
            return
    pixels = load_tile(embeddings, offs_n, BLOCK_D)
    own, lo, width, positive_lo, positive_width = load_row_ranges(pixel_ranges, offs_n)
    max_positive = tl.full([BLOCK_N], float("-inf"), tl.float32)
    max_negative = tl.full([BLOCK_N], float("-inf"), tl.float32)
    sum_positive = tl.zeros([BLOCK_N], tl.float32)
    sum_negative = tl.zeros([BLOCK_N], tl.float32)
    entries, uniform_end, excluding_end, columns_end, masked_end = visit_bounds(visit_entries, visit_counts, tile,
                                                                               tiles_m)

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

    # Pass 3: masked tiles of a pixel tile of one type: membership per column, the own segment per pair.
    # (COLUMN_MASKED: a configuration whose registers do not allow it sends these tiles to pass 4.)
    lost = tl.zeros([BLOCK_N], tl.int32)
    pairs_start = columns_end
    if EXACT:                   # the rare redo takes the column-masked tiles in pass 4: one max per set
        pairs_start = excluding_end
    if COLUMN_MASKED and not EXACT:
        # the shift: a bound on every logit of the row, |e| max|p| kappa log2(e) (no max per tile; a set
        # lost below it is flagged as in pass 4)
        bound = tl.sqrt(tl.sum(pixels.to(tl.float32) * pixels.to(tl.float32), axis=1)) * (
            tl.load(prototype_norm) * scale)
        own_partner, own_positive = own_membership(own, positive_lo, positive_width, pixel_words,
                                                   prototype_words, offs_n, lo, width, SET_MODE, NUM_WORDS)
        for visit in range(excluding_end, columns_end):
            start = (tl.load(entries + visit) >> 1) * BLOCK_M
            offs_m = start.to(tl.int64) + tl.arange(0, BLOCK_M)
            similarity = dot(pixels, tl.trans(load_tile(prototypes, offs_m, BLOCK_D)), IEEE)
            partner, positive = column_members(start, tile.to(tl.int64) * BLOCK_N, pixel_ranges, pixel_words,
                                               prototype_words, prototype_keys, SET_MODE, NUM_WORDS, BLOCK_M)
            own_column = tl.arange(0, BLOCK_M)[None, :] == (own - start)[:, None]
            exps = tl.where(own_column, 0.0, tl.math.exp2(similarity * scale - bound[:, None]))
            negative = partner & ~positive
            tile_positive = tl.sum(exps * tl.where(positive, 1.0, 0.0)[None, :], axis=1)
            tile_negative = tl.sum(exps * tl.where(negative, 1.0, 0.0)[None, :], axis=1)
            # members of each set in the tile, less the own segment
            own_here = _in_range(own, start, BLOCK_M) & own_partner
            positives = tl.sum(positive.to(tl.int32), axis=0) - (own_here & own_positive).to(tl.int32)
            negatives = tl.sum(negative.to(tl.int32), axis=0) - (own_here & ~own_positive).to(tl.int32)
            lost |= (((positives > 0) & (tile_positive < LOST_BELOW)) |
                     ((negatives > 0) & (tile_negative < LOST_BELOW))).to(tl.int32)
            max_positive, sum_positive = _merge_tile_sum(max_positive, sum_positive, bound, tile_positive)
            max_negative, sum_negative = _merge_tile_sum(max_negative, sum_negative, bound, tile_negative)

    # Pass 4: masked tiles of a pixel tile of several types: membership per pair.
    for visit in range(pairs_start, masked_end):
        offs_m = (tl.load(entries + visit) >> 1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        similarity = dot(pixels, tl.trans(load_tile(prototypes, offs_m, BLOCK_D)), IEEE)
        masked = tl.where(tile_partners(offs_m, own, lo, width, False), similarity, float("-inf"))
        if EXACT:
            positive = tile_positives(offs_n, offs_m, positive_lo, positive_width, pixel_words, prototype_words,
                                      SET_MODE, NUM_WORDS, False)
            max_positive, sum_positive, max_negative, sum_negative = _merge_two_sets(
                masked * scale, positive, max_positive, sum_positive, max_negative, sum_negative)
        else:           # one max per tile, shared by both sets
            tile_max = tl.max(masked, axis=1) * scale
            shift = tl.where(tile_max == float("-inf"), 0.0, tile_max)
            exps = tl.math.exp2(masked * scale - shift[:, None])                       # 0 off the partners
            # (the positives after the max: a boolean tile live across a reduction is packed bit by bit)
            positive = tile_positives(offs_n, offs_m, positive_lo, positive_width, pixel_words, prototype_words,
                                      SET_MODE, NUM_WORDS, False)
            tile_positive = tl.sum(tl.where(positive, exps, 0.0), axis=1)
            tile_negative = tl.sum(tl.where(positive, 0.0, exps), axis=1)
            may_positive, may_negative = _members_in_tile(offs_m, offs_n, lo, width, positive_lo, positive_width,
                                                          prototype_words, pixel_words, SET_MODE, NUM_WORDS,
                                                          BLOCK_M)
            lost |= ((may_positive & (tile_positive < LOST_BELOW)) |
                     (may_negative & (tile_negative < LOST_BELOW))).to(tl.int32)
            max_positive, sum_positive = _merge_tile_sum(max_positive, sum_positive, shift, tile_positive)
            max_negative, sum_negative = _merge_tile_sum(max_negative, sum_negative, shift, tile_negative)

    index = tl.load(pixel_index + offs_n)
    stored = index >= 0
    if EXACT:
        stored = stored & flagged
    else:
        tl.store(flags + offs_n, lost)
    index = index.to(tl.int64)
    has_positive = sum_positive > 0
    has_negative = sum_negative > 0
    tl.store(outputs + index, tl.where(has_positive, (max_positive + tl.log2(tl.where(has_positive, sum_positive, 1.0)))
                                       * LN2, float("-inf")), mask=stored)
    tl.store(outputs + num_pixels + index, tl.where(has_negative, (max_negative + tl.log2(
        tl.where(has_negative, sum_negative, 1.0))) * LN2, float("-inf")), mask=stored)
    tl.store(outputs + 2 * num_pixels + index, has_positive.to(tl.float32), mask=stored)
    if not EXACT:               # (the redo leaves the own logits the fast launch wrote)
        own_logit = own_similarity(embeddings, offs_n, own_prototypes, own_stride_row, own_stride_col, segment,
                                   index, stored, dim, BLOCK_D) * (scale * LN2)
        tl.store(outputs + 3 * num_pixels + index, own_logit, mask=stored)


def launch_pixel_segment_lse(sorted_embeddings: torch.Tensor, sorted_prototypes: torch.Tensor,
                             prototype_norm: torch.Tensor, prototypes: torch.Tensor, segment: torch.Tensor, plan,
                             config, kappa: float) -> torch.Tensor:
    """sorted_embeddings [n_pad, BLOCK_D], sorted_prototypes [m_pad, BLOCK_D] (``ContrastPlan`` slots,
    zero-padded, same float dtype), prototype_norm [1] float32 (their largest norm); prototypes [M, D] and
    segment [N] int64 as the caller has them (the own segments' logits); config: ``configs.ContrastConfig``.
    Returns [4, N] float32: lse over S+ and over S- less the own segment (natural log, -inf when empty),
    1.0 where S+ less it is not empty, and the own segment's logit kappa <e, p_own>; 0 for pixels that
    do not participate."""
    block_d = sorted_embeddings.shape[1]
    device = sorted_embeddings.device
    outputs = torch.zeros(4, plan.pixel_order.shape[0], device=device, dtype=torch.float32)
    flags = torch.empty(plan.n_pad, device=device, dtype=torch.int32)
    for exact in LAUNCHES:               # the exact launch redoes the rows the fast one flagged, if any
        pixel_segment_lse_kernel[(plan.tiles_n,)](
            sorted_embeddings, sorted_prototypes, plan.pixel_ranges, plan.pixel_words, plan.prototype_words,
            plan.prototype_keys, plan.row_entries, plan.row_counts, plan.tiles_m, plan.pixel_index, outputs,
            outputs.shape[1], flags, kappa * LOG2E, prototype_norm, prototypes, prototypes.stride(0),
            prototypes.stride(1), segment, prototypes.shape[1],
            SET_MODE=plan.set_mode, NUM_WORDS=plan.num_words, IEEE=ieee_dot(sorted_embeddings.dtype), EXACT=exact,
            COLUMN_MASKED=config.column_masked, BLOCK_N=config.block_n, BLOCK_M=config.block_m, BLOCK_D=block_d,
            num_warps=config.forward.num_warps, num_stages=config.forward.num_stages)
    return outputs
