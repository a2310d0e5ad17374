"""Forward of the pixel-to-segment contrastive loss: per-pixel log-sum-exp.

Each program owns BLOCK_N pixels and streams every prototype tile past them,
like the fused-attention forward. Nothing N x M is stored: per pixel it
keeps a running max and sum for the positive set and for the negative set
(own segment excluded) plus the number of positives, and writes
  lse_positive_other [N], lse_negative [N], num_positive_other [N]  (float32).
The wrapper adds the own-segment term (segsort+ rule) in O(N * D).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import (GPU_BLOCKS, block_dim, contrast_tile, finish_lse, ieee_dot, load_rows, online_lse_update,
                    tile_configs)


@triton.autotune(configs=tile_configs({"BLOCK_N": 32, "BLOCK_M": 32}, GPU_BLOCKS),
                 key=["D", "SET_MODE", "HAS_GROUPS"])
@triton.jit
def pixel_segment_lse_kernel(
    embeddings, prototypes, own_segment,
    pixel_labels, prototype_labels, pixel_groups, prototype_groups,
    lse_positive_out, lse_negative_out, num_positive_out,
    N, M, D, num_words, kappa,
    stride_en, stride_ed, stride_pm, stride_pd,
    SET_MODE: tl.constexpr, HAS_GROUPS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # int64 offsets: N * D and N * M may pass 2^31 at high resolution.
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    pixel_tile = load_rows(embeddings, offs_n, mask_n, offs_d, mask_d, stride_en, stride_ed)
    own = tl.load(own_segment + offs_n, mask=mask_n, other=-1)

    max_positive = tl.full([BLOCK_N], float("-inf"), tl.float32)
    sum_positive = tl.zeros([BLOCK_N], tl.float32)
    max_negative = tl.full([BLOCK_N], float("-inf"), tl.float32)
    sum_negative = tl.zeros([BLOCK_N], tl.float32)
    num_positive = tl.zeros([BLOCK_N], tl.float32)
    for start_m in range(0, M, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M).to(tl.int64)
        mask_m = offs_m < M
        logits, positive, negative, _ = contrast_tile(                                 # [BLOCK_N, BLOCK_M] fp32
            pixel_tile, prototypes, offs_n, mask_n, own, offs_m, mask_m, offs_d, mask_d, stride_pm, stride_pd,
            kappa, pixel_labels, prototype_labels, num_words, pixel_groups, prototype_groups,
            SET_MODE, HAS_GROUPS, IEEE)
        max_positive, sum_positive = online_lse_update(max_positive, sum_positive, logits, positive)
        max_negative, sum_negative = online_lse_update(max_negative, sum_negative, logits, negative)
        num_positive += tl.sum(positive.to(tl.float32), axis=1)

    lse_positive = finish_lse(max_positive, sum_positive)
    lse_negative = finish_lse(max_negative, sum_negative)
    tl.store(lse_positive_out + offs_n, lse_positive, mask=mask_n)
    tl.store(lse_negative_out + offs_n, lse_negative, mask=mask_n)
    tl.store(num_positive_out + offs_n, num_positive, mask=mask_n)


def launch_pixel_segment_lse(embeddings, prototypes, own_segment, pixel_labels, prototype_labels,
                             pixel_groups, prototype_groups, kappa: float):
    """embeddings [N, D], prototypes [M, D] (same float dtype, any strides);
    own_segment [N] int64; labels contiguous int64 ([N]/[M] or [N, W]/[M, W]);
    groups [N]/[M] int64 or None.
    Returns lse_positive_other, lse_negative, num_positive_other: [N] float32 each."""
    num_pixels, dim = embeddings.shape
    outputs = [torch.empty(num_pixels, device=embeddings.device, dtype=torch.float32) for _ in range(3)]
    has_groups = pixel_groups is not None
    grid = lambda meta: (triton.cdiv(num_pixels, meta["BLOCK_N"]),)
    pixel_segment_lse_kernel[grid](
        embeddings, prototypes, own_segment, pixel_labels, prototype_labels,
        pixel_groups if has_groups else own_segment, prototype_groups if has_groups else own_segment,
        *outputs,
        num_pixels, prototypes.shape[0], dim, pixel_labels.shape[1] if pixel_labels.dim() == 2 else 1, kappa,
        embeddings.stride(0), embeddings.stride(1), prototypes.stride(0), prototypes.stride(1),
        SET_MODE=pixel_labels.dim() == 2, HAS_GROUPS=has_groups, IEEE=ieee_dot(embeddings.dtype),
        BLOCK_D=block_dim(dim),
    )
    return tuple(outputs)
