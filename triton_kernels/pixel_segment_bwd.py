"""Backward of the pixel-to-segment contrastive loss, by recomputation.

Two kernels rather than one kernel with atomics:
- ``grad_embeddings_kernel``: a program per pixel tile streams the prototype
  tiles (as the forward) and accumulates dE = G @ P in registers.
- ``grad_prototypes_kernel``: a program per (prototype tile, pixel split)
  streams its share of the pixel tiles and accumulates dP = G^T @ E; the
  splits write float32 partials [S, M, D] that are summed afterwards.
Atomics on dP would save one recomputation of the similarity tiles (D = 64:
a cheap dot), but make float32 sums depend on scheduling order. Two kernels
keep training bit-reproducible, which resuming a killed run exactly relies on.

G is the per-tile gradient w.r.t. the logits for unit upstream gradient
(``contrastive_grad_tile``); the per-pixel upstream gradient enters scaled to
[-1, 1] (``grad_scale`` = its max magnitude is applied once at the end), so
G stays well inside float16 range when it is cast for the tensor-core dot.
The own-segment term is added by the caller in O(N * D).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import (GPU_BLOCKS, block_dim, contrast_tile, contrastive_grad_tile, dot, ieee_dot,
                    load_pixel_stats, load_rows, load_rows_transposed, segment_membership, tile_configs)

# Pixels handled by one split of grad_prototypes_kernel: a multiple of every
# BLOCK_N candidate, so the split boundaries never cut a tile.
PIXELS_PER_SPLIT_GPU = 8192
PIXELS_PER_SPLIT_INTERPRET = 64


@triton.autotune(configs=tile_configs({"BLOCK_N": 32, "BLOCK_M": 32}, GPU_BLOCKS),
                 key=["D", "SET_MODE", "HAS_GROUPS"])
@triton.jit
def grad_embeddings_kernel(
    embeddings, prototypes, own_segment,
    pixel_labels, prototype_labels, pixel_groups, prototype_groups,
    lse_positive, lse_all, pixel_grad, grad_out,
    N, M, D, num_words, kappa,
    stride_en, stride_ed, stride_pm, stride_pd,
    SET_MODE: tl.constexpr, HAS_GROUPS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    pixel_tile = load_rows(embeddings, offs_n, mask_n, offs_d, mask_d, stride_en, stride_ed)
    own, lse_pos, lse_tot, upstream = load_pixel_stats(offs_n, mask_n, own_segment, lse_positive, lse_all,
                                                       pixel_grad)

    accumulator = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)              # dE tile, fp32
    for start_m in range(0, M, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M).to(tl.int64)
        mask_m = offs_m < M
        logits, positive, negative, prototype_tile_t = contrast_tile(
            pixel_tile, prototypes, offs_n, mask_n, own, offs_m, mask_m, offs_d, mask_d, stride_pm, stride_pd,
            kappa, pixel_labels, prototype_labels, num_words, pixel_groups, prototype_groups,
            SET_MODE, HAS_GROUPS, IEEE)
        grad_logits = contrastive_grad_tile(logits, positive, negative, lse_pos, lse_tot) * upstream[:, None]
        accumulator += dot(grad_logits.to(prototype_tile_t.dtype), tl.trans(prototype_tile_t), IEEE)
    tl.store(grad_out + offs_n[:, None] * D + offs_d[None, :], accumulator,
             mask=mask_n[:, None] & mask_d[None, :])


@triton.autotune(configs=tile_configs({"BLOCK_N": 32, "BLOCK_M": 32}, GPU_BLOCKS),
                 key=["D", "SET_MODE", "HAS_GROUPS"])
@triton.jit
def grad_prototypes_kernel(
    embeddings, prototypes, own_segment,
    pixel_labels, prototype_labels, pixel_groups, prototype_groups,
    lse_positive, lse_all, pixel_grad, partial_out,
    N, M, D, num_words, kappa, pixels_per_split,
    stride_en, stride_ed, stride_pm, stride_pd,
    SET_MODE: tl.constexpr, HAS_GROUPS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    split = tl.program_id(1).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    prototype_tile_t = load_rows_transposed(prototypes, offs_m, mask_m, offs_d, mask_d, stride_pm, stride_pd)

    accumulator = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)              # dP tile, fp32
    split_start = split * pixels_per_split
    split_end = tl.minimum(split_start + pixels_per_split, N)
    for start_n in range(split_start, split_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N).to(tl.int64)
        mask_n = offs_n < split_end
        pixel_tile = load_rows(embeddings, offs_n, mask_n, offs_d, mask_d, stride_en, stride_ed)
        own, lse_pos, lse_tot, upstream = load_pixel_stats(offs_n, mask_n, own_segment, lse_positive, lse_all,
                                                           pixel_grad)
        # the prototype tile stays in registers; the pixel tile is the streamed operand here
        logits = dot(pixel_tile, prototype_tile_t, IEEE) * kappa
        positive, negative = segment_membership(offs_n, mask_n, own, offs_m, mask_m,
                                                pixel_labels, prototype_labels, num_words,
                                                pixel_groups, prototype_groups, SET_MODE, HAS_GROUPS)
        grad_logits = contrastive_grad_tile(logits, positive, negative, lse_pos, lse_tot) * upstream[:, None]
        accumulator += dot(tl.trans(grad_logits.to(pixel_tile.dtype)), pixel_tile, IEEE)
    tl.store(partial_out + split * M * D + offs_m[:, None] * D + offs_d[None, :], accumulator,
             mask=mask_m[:, None] & mask_d[None, :])


def launch_pixel_segment_grads(embeddings, prototypes, own_segment, pixel_labels, prototype_labels,
                               pixel_groups, prototype_groups, kappa: float,
                               lse_positive, lse_all, pixel_grad):
    """Gradients of sum_i pixel_grad[i] * L(i) over the non-own segments.

    embeddings [N, D], prototypes [M, D]; lse_positive, lse_all, pixel_grad [N]
    float32. Returns (dE [N, D], dP [M, D]) in float32."""
    num_pixels, dim = embeddings.shape
    num_prototypes = prototypes.shape[0]
    device = embeddings.device
    grad_scale = float(pixel_grad.abs().max())
    grad_embeddings = torch.zeros(num_pixels, dim, device=device, dtype=torch.float32)
    grad_prototypes = torch.zeros(num_prototypes, dim, device=device, dtype=torch.float32)
    if grad_scale == 0.0:
        return grad_embeddings, grad_prototypes
    unit_grad = (pixel_grad / grad_scale).contiguous()
    has_groups = pixel_groups is not None
    common = dict(SET_MODE=pixel_labels.dim() == 2, HAS_GROUPS=has_groups,
                  IEEE=ieee_dot(embeddings.dtype), BLOCK_D=block_dim(dim))
    groups = (pixel_groups if has_groups else own_segment, prototype_groups if has_groups else own_segment)
    num_words = pixel_labels.shape[1] if pixel_labels.dim() == 2 else 1
    strides = (embeddings.stride(0), embeddings.stride(1), prototypes.stride(0), prototypes.stride(1))

    grid_n = lambda meta: (triton.cdiv(num_pixels, meta["BLOCK_N"]),)
    grad_embeddings_kernel[grid_n](
        embeddings, prototypes, own_segment, pixel_labels, prototype_labels, *groups,
        lse_positive, lse_all, unit_grad, grad_embeddings,
        num_pixels, num_prototypes, dim, num_words, kappa, *strides, **common)

    pixels_per_split = PIXELS_PER_SPLIT_INTERPRET if embeddings.device.type == "cpu" else PIXELS_PER_SPLIT_GPU
    num_splits = triton.cdiv(num_pixels, pixels_per_split)
    partials = torch.empty(num_splits, num_prototypes, dim, device=device, dtype=torch.float32)
    grid_m = lambda meta: (triton.cdiv(num_prototypes, meta["BLOCK_M"]), num_splits)
    grad_prototypes_kernel[grid_m](
        embeddings, prototypes, own_segment, pixel_labels, prototype_labels, *groups,
        lse_positive, lse_all, unit_grad, partials,
        num_pixels, num_prototypes, dim, num_words, kappa, pixels_per_split, *strides, **common)
    torch.sum(partials, dim=0, out=grad_prototypes)

    scale = kappa * grad_scale
    return grad_embeddings.mul_(scale), grad_prototypes.mul_(scale)
