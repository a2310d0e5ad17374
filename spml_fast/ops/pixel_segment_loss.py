"""The pixel-to-segment contrastive loss (docs/method.md, the loss): the autograd wrapper and the public
entry. The engines live apart: ``pixel_segment_torch`` (tiled PyTorch) and ``pixel_segment_triton``
(the Triton glue); ``dispatch`` chooses.

Decomposition shared by every path. For pixel i the streamed part covers the
segments other than its own segment c(i):
    lse_positive_other(i), lse_negative(i), num_positive_other(i)
and the own segment's logit kappa <e_i, p_c(i)>, which the wrapper adds (segsort+ rule):
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

from typing import Optional

import torch

from . import _validate as check
from .dispatch import accumulation_dtype, select_backend
from .loss_inputs import LossInputs
from .membership import participating_pixels, reduce_pixel_losses
from .pixel_segment_torch import PixelTypes, torch_other_segment_grads, torch_other_segment_stats
from .pixel_segment_triton import TritonPlan, triton_other_segment_grads, triton_other_segment_stats
from .tiling import DEFAULT, TileConfig


# backend -> (prepare once per call from the labels, forward stats, backward gradients)
_PATHS = {
    "torch": (lambda embeddings, inputs: PixelTypes.build(inputs.labels), torch_other_segment_stats,
              torch_other_segment_grads),
    "triton": (TritonPlan.build, triton_other_segment_stats, triton_other_segment_grads),
}


class PixelSegmentLossFunction(torch.autograd.Function):
    """embeddings [N, D], prototypes [M, D] -> per-pixel loss [N] float32 (float64 for
    float64 inputs), 0 where the pixel does not participate."""

    @staticmethod
    def forward(ctx, embeddings, prototypes, inputs: LossInputs, backend: str):
        prepare, stats, _ = _PATHS[backend]
        prepared = prepare(embeddings, inputs)
        lse_positive_other, lse_negative, num_positive_other, own_logit = stats(embeddings, prototypes, inputs,
                                                                                 prepared)
        has_other_positive = num_positive_other > 0
        lse_positive = torch.where(has_other_positive, lse_positive_other, own_logit)
        lse_all = torch.logaddexp(lse_positive, lse_negative)
        left_out = ~participating_pixels(inputs.labels.pixel)
        # masked, not multiplied: a non-participating pixel (NaN embedding, say) never reaches the mean
        per_pixel = (lse_all - lse_positive).masked_fill(left_out, 0.0)                # [N] accumulation dtype
        # kappa * d L / d own_logit: the own segment is in S+ only when no other positive exists.
        own_grad = (torch.expm1(own_logit - lse_all) * inputs.kappa).masked_fill(left_out | has_other_positive, 0.0)
        ctx.save_for_backward(embeddings, prototypes, lse_positive, lse_all, own_grad, left_out)
        ctx.inputs, ctx.backend, ctx.prepared = inputs, backend, prepared
        return per_pixel

    @staticmethod
    def backward(ctx, grad_per_pixel):
        embeddings, prototypes, lse_positive, lse_all, own_grad, left_out = ctx.saved_tensors
        inputs = ctx.inputs
        _, _, grads = _PATHS[ctx.backend]
        dtype = accumulation_dtype(embeddings)
        pixel_grad = grad_per_pixel.to(dtype).masked_fill(left_out, 0.0)
        grad_embeddings, grad_prototypes, own_scale = grads(embeddings, prototypes, inputs, ctx.prepared,
                                                            lse_positive, lse_all, pixel_grad, own_grad)
        # dE is whole; dP still needs the own segment's terms, own_scale * e, summed per segment
        own_terms = embeddings.to(dtype).masked_fill(left_out[:, None], 0.0) * own_scale[:, None]
        grad_prototypes += segment_sum_sorted(own_terms, inputs.segment, grad_prototypes.shape[0])
        return grad_embeddings.to(embeddings.dtype), grad_prototypes.to(prototypes.dtype), None, None


def segment_sum_sorted(values: torch.Tensor, segment: torch.Tensor, num_segments: int) -> torch.Tensor:
    """values [N, D] float, segment [N] int64 in [0, M) -> [M, D]: the sum of each segment's rows, in the
    pixels' order, with no atomics (``index_add_`` adds in whatever order the GPU's atomics land, so its
    float sums change from run to run). A stable sort by segment, then one sequential reduction per
    output element (``torch.segment_reduce``); the counts are integer sums, exact in any order."""
    order = torch.argsort(segment, stable=True)
    counts = torch.zeros(num_segments, dtype=torch.int64, device=segment.device).scatter_add_(
        0, segment, torch.ones_like(segment))
    return torch.segment_reduce(values.index_select(0, order), "sum", lengths=counts, unsafe=True)


def pixel_segment_loss(embeddings: torch.Tensor, prototypes: torch.Tensor, segment: torch.Tensor,
                       pixel_labels: torch.Tensor, prototype_labels: torch.Tensor, kappa: float,
                       pixel_groups: Optional[torch.Tensor] = None,
                       prototype_groups: Optional[torch.Tensor] = None,
                       reduction: str = "mean", *, backend: str = "auto",
                       tiles: TileConfig = DEFAULT) -> torch.Tensor:
    """Pixel-to-segment contrastive loss of SPML (docs/method.md, the loss), without any N x M tensor.

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
    ranges = check.RangeChecks()
    segment = check.check_index_vector("segment", segment, num_pixels, device, upper=num_prototypes, ranges=ranges)
    pixel_labels, prototype_labels = check.check_labels(pixel_labels, prototype_labels,
                                                        num_pixels, num_prototypes, device, ranges)
    pixel_groups, prototype_groups = check.check_groups(pixel_groups, prototype_groups,
                                                        num_pixels, num_prototypes, device, ranges)
    ranges.assert_all()
    kappa = check.check_kappa(kappa)
    reduction = check.check_reduction(reduction)
    inputs = LossInputs(segment, check.Labels(pixel_labels, prototype_labels, pixel_groups, prototype_groups),
                        kappa, tiles)
    chosen = select_backend(backend, embeddings)
    per_pixel = PixelSegmentLossFunction.apply(embeddings, prototypes, inputs, chosen)
    return reduce_pixel_losses(per_pixel, participating_pixels(pixel_labels), reduction)
