"""Shared Triton helpers: the similarity tile, the label-defined membership of
a (pixel, segment) tile, the online log-sum-exp update, and tile configs."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Triton's interpreter stores bfloat16 as uint16 and its tl.dot multiplies the
# bit patterns (triton-lang/triton#11584, unfixed in 3.9): under the
# interpreter, dot operands are upcast to float32 first. bf16 x bf16 products
# are exact in float32, so this matches the tensor-core result up to the
# order of accumulation. Compiled GPU code is unaffected.
UPCAST_DOT_OPERANDS: tl.constexpr = tl.constexpr(INTERPRET)


def tile_configs(interpret_config: dict, gpu_blocks: list[tuple[int, int]]) -> list[triton.Config]:
    """Autotune candidates: one small config under the interpreter (no tuning
    runs there), otherwise every (BLOCK_N, BLOCK_M) with 4 / 8 warps."""
    if INTERPRET:
        return [triton.Config(interpret_config, num_warps=1)]
    configs = []
    for block_n, block_m in gpu_blocks:
        for warps in (4, 8):
            for stages in (2, 3):
                configs.append(triton.Config({"BLOCK_N": block_n, "BLOCK_M": block_m},
                                             num_warps=warps, num_stages=stages))
    return configs


GPU_BLOCKS = [(64, 64), (128, 64), (64, 128), (128, 128)]


def block_dim(dim: int) -> int:
    """Whole-row tile width for D: a power of two, >= 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(dim))


def ieee_dot(dtype: torch.dtype) -> bool:
    """float32 inputs use exact fp32 products (TF32 would cost ~1e-3 in the
    similarities, 1e-2 in the logits at kappa = 16); bf16/fp16 use tensor cores."""
    return dtype == torch.float32


@triton.jit
def load_rows(ptr, offs_rows, mask_rows, offs_d, mask_d, stride_row, stride_d):
    """Load a [ROWS, BLOCK_D] tile of a row-major-ish [rows, D] matrix (any strides)."""
    return tl.load(ptr + offs_rows[:, None] * stride_row + offs_d[None, :] * stride_d,
                   mask=mask_rows[:, None] & mask_d[None, :], other=0.0)


@triton.jit
def load_rows_transposed(ptr, offs_rows, mask_rows, offs_d, mask_d, stride_row, stride_d):
    """Load the same tile as [BLOCK_D, ROWS], ready to be the right operand of tl.dot."""
    return tl.load(ptr + offs_rows[None, :] * stride_row + offs_d[:, None] * stride_d,
                   mask=mask_rows[None, :] & mask_d[:, None], other=0.0)


@triton.jit
def dot(a, b, IEEE: tl.constexpr):
    """a @ b accumulated in float32."""
    if UPCAST_DOT_OPERANDS:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def segment_membership(offs_n, mask_n, own_segment, offs_m, mask_m,
                       pixel_labels, prototype_labels, num_words,
                       pixel_groups, prototype_groups,
                       SET_MODE: tl.constexpr, HAS_GROUPS: tl.constexpr):
    """(positive, negative) bool masks of a [BLOCK_N, BLOCK_M] tile, SPEC §5.

    The own segment of each pixel is excluded from both (the caller adds its
    term), as are padding rows/columns and, with groups, other groups.
    Labels are contiguous: [N] / [M] class ids, or [N, W] / [M, W] bit sets.
    """
    valid = (mask_n[:, None] & mask_m[None, :]) & (offs_m[None, :] != own_segment[:, None])
    if HAS_GROUPS:
        group_i = tl.load(pixel_groups + offs_n, mask=mask_n, other=-1)
        group_s = tl.load(prototype_groups + offs_m, mask=mask_m, other=-1)
        valid = valid & (group_i[:, None] == group_s[None, :])
    if SET_MODE:
        # shared != 0 iff the two class sets intersect; one 64-bit word at a time.
        tags_i = tl.load(pixel_labels + offs_n * num_words, mask=mask_n, other=0)
        tags_s = tl.load(prototype_labels + offs_m * num_words, mask=mask_m, other=0)
        shared = tags_i[:, None] & tags_s[None, :]
        for word in range(1, num_words):
            tags_i = tl.load(pixel_labels + offs_n * num_words + word, mask=mask_n, other=0)
            tags_s = tl.load(prototype_labels + offs_m * num_words + word, mask=mask_m, other=0)
            shared = shared | (tags_i[:, None] & tags_s[None, :])
        positive = valid & (shared != 0)
        negative = valid & (shared == 0)
    else:
        label_i = tl.load(pixel_labels + offs_n, mask=mask_n, other=-1)
        label_s = tl.load(prototype_labels + offs_m, mask=mask_m, other=-1)
        labelled = valid & (label_i[:, None] >= 0) & (label_s[None, :] >= 0)
        positive = labelled & (label_i[:, None] == label_s[None, :])
        negative = labelled & (label_i[:, None] != label_s[None, :])
    return positive, negative


@triton.jit
def contrast_tile(pixel_tile, prototypes, offs_n, mask_n, own_segment, offs_m, mask_m, offs_d, mask_d,
                  stride_pm, stride_pd, kappa, pixel_labels, prototype_labels, num_words,
                  pixel_groups, prototype_groups,
                  SET_MODE: tl.constexpr, HAS_GROUPS: tl.constexpr, IEEE: tl.constexpr):
    """One step of every loss kernel's tile loop: load the prototype tile, compute
    kappa * similarity [BLOCK_N, BLOCK_M] in float32 and the tile's membership.
    Returns (logits, positive, negative, prototype_tile_t [BLOCK_D, BLOCK_M])."""
    prototype_tile_t = load_rows_transposed(prototypes, offs_m, mask_m, offs_d, mask_d, stride_pm, stride_pd)
    logits = dot(pixel_tile, prototype_tile_t, IEEE) * kappa
    positive, negative = segment_membership(offs_n, mask_n, own_segment, offs_m, mask_m,
                                            pixel_labels, prototype_labels, num_words,
                                            pixel_groups, prototype_groups, SET_MODE, HAS_GROUPS)
    return logits, positive, negative, prototype_tile_t


@triton.jit
def load_pixel_stats(offs_n, mask_n, own_segment, lse_positive, lse_all, pixel_grad):
    """Per-pixel inputs of the backward kernels: own segment, the forward's
    log-sum-exps and the upstream gradient (scaled to [-1, 1])."""
    own = tl.load(own_segment + offs_n, mask=mask_n, other=-1)
    lse_pos = tl.load(lse_positive + offs_n, mask=mask_n, other=0.0)
    lse_tot = tl.load(lse_all + offs_n, mask=mask_n, other=0.0)
    upstream = tl.load(pixel_grad + offs_n, mask=mask_n, other=0.0)
    return own, lse_pos, lse_tot, upstream


@triton.jit
def online_lse_update(running_max, running_sum, logits, member):
    """Fold the members of one tile into a running (max, sum of exp(x - max)) per row.

    Rows with no member so far keep max = -inf; the shift uses 0 there, so
    every exp argument is <= 0 or -inf and nothing overflows or turns NaN.
    """
    masked = tl.where(member, logits, float("-inf"))
    new_max = tl.maximum(running_max, tl.max(masked, axis=1))
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(tl.exp(masked - shift[:, None]), axis=1)
    return new_max, running_sum


@triton.jit
def finish_lse(running_max, running_sum):
    """log-sum-exp of the folded rows; -inf for a row without members (no log(0))."""
    has_member = running_sum > 0
    return tl.where(has_member, running_max + tl.log(tl.where(has_member, running_sum, 1.0)), float("-inf"))


@triton.jit
def contrastive_grad_tile(logits, positive, negative, lse_positive, lse_all):
    """dL/dlogit of one tile for unit upstream gradient (own segment excluded):
    softmax over S+ u S- minus softmax over S+, restricted to the members."""
    p_all = tl.exp(tl.minimum(logits - lse_all[:, None], 0.0))
    p_positive = tl.exp(tl.minimum(logits - lse_positive[:, None], 0.0))
    return tl.where(positive | negative, p_all, 0.0) - tl.where(positive, p_positive, 0.0)
