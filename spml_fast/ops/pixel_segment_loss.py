"""The pixel-to-segment contrastive loss (SPEC §5): autograd wrapper, tiled
PyTorch path, dispatch to the Triton kernels, and the public entry.

Decomposition shared by every path. For pixel i the streamed part covers the
segments other than its own segment c(i):
    lse_positive_other(i), lse_negative(i), num_positive_other(i)
and the wrapper adds the own segment in O(N * D) (segsort+ rule):
    lse_positive = lse_positive_other      if num_positive_other > 0
                 = kappa <e_i, p_c(i)>     otherwise
    lse_all      = logaddexp(lse_positive, lse_negative)
    L(i)         = lse_all - lse_positive  (0 for non-participating pixels)
Backward: dL/dlogit(i, s) = softmax over S+ u S- minus softmax over S+,
recomputed tile by tile; the own-segment column again in O(N * D).

Memory (N pixels, M segments, D dims): saved for backward are the inputs and
five [N] float32 vectors; the working set of a pass is one tile
(Triton: BLOCK_N x BLOCK_M in registers; PyTorch: a [chunk, M] block sized
by ``TileConfig``). The dense formulation holds several N x M tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import _validate as check
from .dispatch import accumulation_dtype, select_backend
from .membership import membership, participating_pixels, reduce_pixel_losses
from .tiling import DEFAULT, TileConfig


@dataclass(frozen=True)
class LossInputs:
    """Everything of a loss call except the two differentiable tensors."""

    segment: torch.Tensor              # [N] int64 in [0, M)
    labels: check.Labels
    kappa: float
    tiles: TileConfig = DEFAULT


# --------------------------------------------------------------------------
# Tiled PyTorch path: chunks of pixels against all prototypes.
# --------------------------------------------------------------------------
def _chunk_membership(inputs: LossInputs, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive, negative) [chunk, M] for the pixels in ``rows``, own segment excluded."""
    labels = inputs.labels
    positive, negative = membership(
        labels.pixel[rows], labels.prototype,
        None if labels.pixel_groups is None else labels.pixel_groups[rows], labels.prototype_groups)
    own = inputs.segment[rows]
    chunk_rows = torch.arange(own.shape[0], device=own.device)
    positive[chunk_rows, own] = False
    negative[chunk_rows, own] = False
    return positive, negative


def _masked_logsumexp(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return logits.masked_fill(~mask, float("-inf")).logsumexp(dim=1)


def _chunks(inputs: LossInputs, num_pixels: int, num_prototypes: int):
    step = inputs.tiles.pixel_chunk(num_pixels, num_prototypes)
    for start in range(0, num_pixels, step):
        yield slice(start, min(start + step, num_pixels))


def torch_other_segment_stats(embeddings, prototypes, inputs: LossInputs):
    """Tiled PyTorch forward: (lse_positive_other, lse_negative, num_positive_other), [N] each,
    in the accumulation dtype (float32; float64 for float64 inputs)."""
    num_pixels, dtype = embeddings.shape[0], accumulation_dtype(embeddings)
    prototypes_t = prototypes.to(dtype).t()
    lse_positive = torch.empty(num_pixels, device=embeddings.device, dtype=dtype)
    lse_negative, num_positive = torch.empty_like(lse_positive), torch.empty_like(lse_positive)
    for rows in _chunks(inputs, num_pixels, prototypes.shape[0]):
        logits = (embeddings[rows].to(dtype) @ prototypes_t).mul_(inputs.kappa)    # [chunk, M]
        positive, negative = _chunk_membership(inputs, rows)
        lse_positive[rows] = _masked_logsumexp(logits, positive)
        lse_negative[rows] = _masked_logsumexp(logits, negative)
        num_positive[rows] = positive.sum(1)
    return lse_positive, lse_negative, num_positive


def torch_other_segment_grads(embeddings, prototypes, inputs: LossInputs, lse_positive, lse_all, pixel_grad):
    """Tiled PyTorch backward over the non-own segments: (dE [N, D], dP [M, D]) in the accumulation dtype."""
    dtype = accumulation_dtype(embeddings)
    prototypes_f = prototypes.to(dtype)
    grad_embeddings = torch.zeros(embeddings.shape, device=embeddings.device, dtype=dtype)
    grad_prototypes = torch.zeros(prototypes.shape, device=embeddings.device, dtype=dtype)
    for rows in _chunks(inputs, embeddings.shape[0], prototypes.shape[0]):
        pixels = embeddings[rows].to(dtype)
        logits = (pixels @ prototypes_f.t()).mul_(inputs.kappa)                     # [chunk, M]
        positive, negative = _chunk_membership(inputs, rows)
        # softmax over S+ u S-, minus softmax over S+ (both <= 1 on their members)
        grad_logits = (logits - lse_all[rows, None]).clamp_(max=0).exp_().mul_(positive | negative)
        grad_logits -= (logits.sub_(lse_positive[rows, None])).clamp_(max=0).exp_().mul_(positive)
        grad_logits.mul_(pixel_grad[rows, None])
        torch.mm(grad_logits, prototypes_f, out=grad_embeddings[rows])
        grad_prototypes.addmm_(grad_logits.t(), pixels)
    return grad_embeddings.mul_(inputs.kappa), grad_prototypes.mul_(inputs.kappa)


# --------------------------------------------------------------------------
# Triton path (CUDA, or CPU through TRITON_INTERPRET=1).
# --------------------------------------------------------------------------
def _triton_args(inputs: LossInputs):
    labels = inputs.labels
    return (inputs.segment, labels.pixel, labels.prototype, labels.pixel_groups, labels.prototype_groups,
            inputs.kappa)


def triton_other_segment_stats(embeddings, prototypes, inputs: LossInputs):
    from spml_fast.triton_kernels.pixel_segment_fwd import launch_pixel_segment_lse
    return launch_pixel_segment_lse(embeddings, prototypes, *_triton_args(inputs))


def triton_other_segment_grads(embeddings, prototypes, inputs: LossInputs, lse_positive, lse_all, pixel_grad):
    from spml_fast.triton_kernels.pixel_segment_bwd import launch_pixel_segment_grads
    return launch_pixel_segment_grads(embeddings, prototypes, *_triton_args(inputs),
                                      lse_positive, lse_all, pixel_grad)


_PATHS = {
    "torch": (torch_other_segment_stats, torch_other_segment_grads),
    "triton": (triton_other_segment_stats, triton_other_segment_grads),
}


class PixelSegmentLossFunction(torch.autograd.Function):
    """embeddings [N, D], prototypes [M, D] -> per-pixel loss [N] float32 (float64 for
    float64 inputs), 0 where the pixel does not participate."""

    @staticmethod
    def forward(ctx, embeddings, prototypes, inputs: LossInputs, backend: str):
        stats, _ = _PATHS[backend]
        lse_positive_other, lse_negative, num_positive_other = stats(embeddings, prototypes, inputs)
        dtype = accumulation_dtype(embeddings)
        own_logit = inputs.kappa * torch.einsum(
            "nd,nd->n", embeddings.to(dtype), prototypes.to(dtype).index_select(0, inputs.segment))
        has_other_positive = num_positive_other > 0
        lse_positive = torch.where(has_other_positive, lse_positive_other, own_logit)
        lse_all = torch.logaddexp(lse_positive, lse_negative)
        participating = participating_pixels(inputs.labels.pixel)
        per_pixel = (lse_all - lse_positive) * participating                      # [N] accumulation dtype
        # d L / d own_logit: the own segment is in S+ only when no other positive exists.
        own_grad = torch.where(has_other_positive, torch.zeros_like(lse_all), torch.exp(own_logit - lse_all) - 1.0)
        ctx.save_for_backward(embeddings, prototypes, lse_positive, lse_all, own_grad, participating)
        ctx.inputs, ctx.backend = inputs, backend
        return per_pixel

    @staticmethod
    def backward(ctx, grad_per_pixel):
        embeddings, prototypes, lse_positive, lse_all, own_grad, participating = ctx.saved_tensors
        inputs = ctx.inputs
        _, grads = _PATHS[ctx.backend]
        dtype = accumulation_dtype(embeddings)
        pixel_grad = (grad_per_pixel.to(dtype) * participating).contiguous()
        grad_embeddings, grad_prototypes = grads(embeddings, prototypes, inputs, lse_positive, lse_all, pixel_grad)
        own_scale = (inputs.kappa * pixel_grad * own_grad)[:, None]                # [N, 1]
        grad_embeddings += own_scale * prototypes.to(dtype).index_select(0, inputs.segment)
        grad_prototypes.index_add_(0, inputs.segment, own_scale * embeddings.to(dtype))
        return grad_embeddings.to(embeddings.dtype), grad_prototypes.to(prototypes.dtype), None, None


def pixel_segment_loss(embeddings: torch.Tensor, prototypes: torch.Tensor, segment: torch.Tensor,
                       pixel_labels: torch.Tensor, prototype_labels: torch.Tensor, kappa: float = 10.0,
                       pixel_groups: Optional[torch.Tensor] = None,
                       prototype_groups: Optional[torch.Tensor] = None,
                       reduction: str = "mean", *, backend: str = "auto",
                       tiles: TileConfig = DEFAULT) -> torch.Tensor:
    """Pixel-to-segment contrastive loss of SPML (SPEC §5, §12), without any N x M tensor.

    Args:
        embeddings: [N, D] float32 / bfloat16 / float16 (float64: PyTorch path only), any strides.
        prototypes: [M, D] same dtype and device; gradients flow to both.
        segment: [N] integer, own segment of each pixel, in [0, M).
        pixel_labels, prototype_labels: [N] / [M] integer class ids (-1 = unlabelled),
            or [N, W] / [M, W] int64 bit sets of classes (set mode).
        kappa: concentration, finite and > 0.
        pixel_groups, prototype_groups: [N] / [M] integer, optional; a segment takes part
            for a pixel only when their groups are equal.
        reduction: "mean" (over participating pixels), "sum", or "none" ([N], 0 where
            the pixel does not participate).
        backend: "auto" (Triton on CUDA or under TRITON_INTERPRET=1, else PyTorch),
            "triton" or "torch".
        tiles: chunking of the PyTorch path.

    Returns: float32 scalar, or [N] float32 for reduction="none" (float64 for float64 inputs).
    """
    check.check_matrix("embeddings", embeddings)
    num_pixels, dim = embeddings.shape
    check.check_matrix("prototypes", prototypes, cols=dim)
    check.check_same_kind("prototypes", prototypes, "embeddings", embeddings)
    num_prototypes = prototypes.shape[0]
    device = embeddings.device
    segment = check.check_index_vector("segment", segment, num_pixels, device, upper=num_prototypes)
    pixel_labels, prototype_labels = check.check_labels(pixel_labels, prototype_labels,
                                                        num_pixels, num_prototypes, device)
    pixel_groups, prototype_groups = check.check_groups(pixel_groups, prototype_groups,
                                                        num_pixels, num_prototypes, device)
    kappa = check.check_kappa(kappa)
    reduction = check.check_reduction(reduction)
    inputs = LossInputs(segment, check.Labels(pixel_labels, prototype_labels, pixel_groups, prototype_groups),
                        kappa, tiles)
    chosen = select_backend(backend, embeddings)
    per_pixel = PixelSegmentLossFunction.apply(embeddings, prototypes, inputs, chosen)
    return reduce_pixel_losses(per_pixel, participating_pixels(pixel_labels), reduction)
