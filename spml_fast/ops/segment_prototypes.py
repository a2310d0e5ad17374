"""Segment prototypes: the L2-normalised mean embedding of each segment (docs/method.md, segments).

Forward: per-segment sums (Triton atomics on CUDA / under the interpreter,
``index_add_`` in PyTorch) then normalisation; the normalised mean equals
the normalised sum, so counts only mark empty segments. Backward: the
Jacobian of the normalisation in O(M * D), then a gather dE = dS[segment]
in O(N * D) (a plain index_select: a kernel would add nothing there).
Memory: [M, D] float32 sums; never an [N, M] one-hot.
"""
from __future__ import annotations

import torch

from . import _validate as check
from .dispatch import accumulation_dtype, select_backend

EPS = 1e-12  # as torch.nn.functional.normalize


def segment_sums(embeddings: torch.Tensor, segment: torch.Tensor, num_segments: int, backend: str):
    """(sums [M, D], counts [M]) of embeddings [N, D] grouped by segment [N] int64, float32
    (float64 for float64 input)."""
    if backend == "triton":
        from spml_fast.triton_kernels.segment_sum import launch_segment_sum
        return launch_segment_sum(embeddings, segment, num_segments)
    dtype = accumulation_dtype(embeddings)
    sums = torch.zeros(num_segments, embeddings.shape[1], device=embeddings.device, dtype=dtype)
    sums.index_add_(0, segment, embeddings.to(dtype))
    counts = torch.bincount(segment, minlength=num_segments).to(dtype)
    return sums, counts


class SegmentPrototypesFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, embeddings, segment, num_segments: int, backend: str):
        sums, counts = segment_sums(embeddings, segment, num_segments, backend)
        norms = sums.norm(dim=1, keepdim=True).clamp_min(EPS)
        prototypes = sums / norms
        ctx.save_for_backward(segment, prototypes, norms)
        ctx.input_dtype = embeddings.dtype
        ctx.mark_non_differentiable(counts)
        return prototypes, counts

    @staticmethod
    def backward(ctx, grad_prototypes, _grad_counts):
        segment, prototypes, norms = ctx.saved_tensors
        grad_prototypes = grad_prototypes.to(prototypes.dtype)
        # d normalize(s) / ds applied to g: (g - p <p, g>) / |s|
        grad_sums = (grad_prototypes - prototypes * (prototypes * grad_prototypes).sum(1, keepdim=True)) / norms
        return grad_sums.index_select(0, segment).to(ctx.input_dtype), None, None, None


def segment_prototypes(embeddings: torch.Tensor, segment: torch.Tensor, num_segments: int,
                       *, backend: str = "auto", return_counts: bool = False):
    """Normalised mean embedding of each segment, differentiable w.r.t. embeddings.

    Args:
        embeddings: [N, D] float (any strides).
        segment: [N] integer in [0, num_segments).
        num_segments: M.
    Returns:
        prototypes [M, D] float32 (float64 for float64 input; a zero row for an empty segment), and with
        ``return_counts`` also counts [M] float32 (pixels per segment).
    """
    check.check_matrix("embeddings", embeddings)
    if not isinstance(num_segments, int) or num_segments <= 0:
        raise ValueError(f"num_segments must be a positive int, got {num_segments!r}")
    segment = check.check_index_vector("segment", segment, embeddings.shape[0], embeddings.device,
                                       upper=num_segments)
    prototypes, counts = SegmentPrototypesFunction.apply(embeddings, segment, num_segments,
                                                         select_backend(backend, embeddings))
    return (prototypes, counts) if return_counts else prototypes
