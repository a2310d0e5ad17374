"""Forward of the pixel-to-segment contrastive loss: per-pixel log-sum-exps.

A program owns one pixel tile of the plan (``spml_fast.ops.contrast_plan``)
and streams the prototype tiles its visit list names, like the
fused-attention forward. Per pixel it keeps one running max shared by both
sets and one sum per set, all in log2 units (kappa * log2(e) folded into
one multiply-add before ``exp2``), so each pair costs one exp:

  pass 1, uniform tiles: every pair is in S+ (or every pair in S-): no
          label loads, no masks; the tile's row sums go to one of the sums;
  pass 2, masked tiles: membership per pair (label / group / own segment /
          ragged edge), non-members at -inf.

Stored per sorted pixel: the running max and the two sums ([n_pad] float32
each). A set whose sum underflowed under the shared max is recomputed
exactly by the caller (rare: only when kappa * 2 passes ~87).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import LOG2E, dot, ieee_dot, load_row_ranges, load_tile, tile_membership


@triton.jit
def pixel_segment_lse_kernel(
    embeddings, prototypes,                                   # [n_pad, BLOCK_D], [m_pad, BLOCK_D], sorted, zero-padded
    pixel_ranges, pixel_words, prototype_words,    # the plan's membership data (utils.tile_membership)
    row_ptr, row_split, row_entries,                          # the plan's visit list per pixel tile
    max_out, positive_out, negative_out,                      # [n_pad] float32, log2 units
    scale,                                                    # kappa * log2(e)
    SET_MODE: tl.constexpr, NUM_WORDS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    tile = tl.program_id(0)
    offs_n = tile.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    pixels = load_tile(embeddings, offs_n, BLOCK_D)
    own, member_lo, member_hi, positive_lo, positive_hi = load_row_ranges(pixel_ranges, offs_n)
    running_max = tl.full([BLOCK_N], float("-inf"), tl.float32)
    sum_positive = tl.zeros([BLOCK_N], tl.float32)
    sum_negative = tl.zeros([BLOCK_N], tl.float32)
    first, split, last = tl.load(row_ptr + tile), tl.load(row_split + tile), tl.load(row_ptr + tile + 1)

    # Pass 1: uniform tiles.
    for visit in range(first, split):
        entry = tl.load(row_entries + visit)
        offs_m = (entry >> 1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        similarity = dot(pixels, tl.trans(load_tile(prototypes, offs_m, BLOCK_D)), IEEE)   # [BN, BM] fp32
        new_max = tl.maximum(running_max, tl.max(similarity, axis=1) * scale)
        rescale = tl.math.exp2(running_max - new_max)
        row_sum = tl.sum(tl.math.exp2(similarity * scale - new_max[:, None]), axis=1)
        positive = (entry & 1).to(tl.float32)
        sum_positive = sum_positive * rescale + row_sum * positive
        sum_negative = sum_negative * rescale + row_sum * (1.0 - positive)
        running_max = new_max

    # Pass 2: masked tiles.
    for visit in range(split, last):
        offs_m = (tl.load(row_entries + visit) >> 1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        similarity = dot(pixels, tl.trans(load_tile(prototypes, offs_m, BLOCK_D)), IEEE)
        positive, negative = tile_membership(offs_n, offs_m, own, member_lo, member_hi, positive_lo, positive_hi,
                                             pixel_words, prototype_words, SET_MODE, NUM_WORDS, False)
        logits = tl.where(positive | negative, similarity * scale, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(logits, axis=1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)        # no member yet: no -inf - -inf
        rescale = tl.math.exp2(running_max - shift)
        exps = tl.math.exp2(logits - shift[:, None])
        sum_positive = sum_positive * rescale + tl.sum(tl.where(positive, exps, 0.0), axis=1)
        sum_negative = sum_negative * rescale + tl.sum(tl.where(negative, exps, 0.0), axis=1)
        running_max = new_max

    tl.store(max_out + offs_n, running_max)
    tl.store(positive_out + offs_n, sum_positive)
    tl.store(negative_out + offs_n, sum_negative)


def launch_pixel_segment_lse(sorted_embeddings: torch.Tensor, sorted_prototypes: torch.Tensor, plan, config,
                             kappa: float):
    """sorted_embeddings [n_pad, BLOCK_D], sorted_prototypes [m_pad, BLOCK_D] (``ContrastPlan`` order,
    zero-padded, same float dtype); config: ``configs.ContrastConfig``.
    Returns (running max, sum over S+, sum over S-), [n_pad] float32 each, log2 units:
    log2-sum-exp2 of a set = max + log2(sum)."""
    n_pad, block_d = sorted_embeddings.shape
    device = sorted_embeddings.device
    outputs = [torch.empty(n_pad, device=device, dtype=torch.float32) for _ in range(3)]
    pixel_segment_lse_kernel[(n_pad // config.block_n,)](
        sorted_embeddings, sorted_prototypes, plan.pixel_ranges, plan.pixel_key, plan.prototype_key,
        plan.row_ptr, plan.row_split, plan.row_entries, *outputs, kappa * LOG2E,
        SET_MODE=plan.set_mode, NUM_WORDS=plan.num_words, IEEE=ieee_dot(sorted_embeddings.dtype),
        BLOCK_N=config.block_n, BLOCK_M=config.block_m, BLOCK_D=block_d,
        num_warps=config.forward.num_warps, num_stages=config.forward.num_stages)
    return tuple(outputs)
