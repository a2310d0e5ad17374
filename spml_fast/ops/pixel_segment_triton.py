"""The Triton glue of the pixel-to-segment loss (``pixel_segment_loss``): the visit plan, sorted and
zero-padded copies of the operands and the kernel launches (``triton_kernels.pixel_segment_fwd`` and
``_bwd``). Device ops only, sizes from the shapes: no host synchronisation in a loss call.

Memory: the sorted copies ([n_pad, BLOCK_D] and [m_pad, BLOCK_D], kept from the forward for the
backward), S float32 partials of dP ([S, m_pad, BLOCK_D]) and a few [N] vectors; the kernels hold one
BLOCK_N x BLOCK_M tile in registers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .contrast_plan import ContrastPlan, build_plan
from .loss_inputs import LossInputs


@dataclass
class TritonPlan:
    plan: ContrastPlan
    config: object               # triton_kernels.configs.ContrastConfig
    block_d: int
    copies: Optional[tuple] = None     # the sorted copies, made in the forward, read again in the backward

    @staticmethod
    def build(embeddings: torch.Tensor, inputs: LossInputs) -> "TritonPlan":
        from spml_fast.triton_kernels.configs import contrast_config
        from spml_fast.triton_kernels.utils import block_dim
        block_d = block_dim(embeddings.shape[1])
        config = contrast_config(embeddings.device, block_d)
        labels = inputs.labels
        plan = build_plan(inputs.segment, labels.pixel, labels.prototype, labels.pixel_groups,
                          labels.prototype_groups, config.block_n, config.block_m, config.column_masked)
        return TritonPlan(plan, config, block_d)

    def sorted_copies(self, embeddings: torch.Tensor, prototypes: torch.Tensor):
        """[n_pad, BLOCK_D] and [m_pad, BLOCK_D] copies in the plan's slots (the kernels read them without
        masks), and the largest prototype norm ([1] float32, the forward's bound on the logits); empty and
        padding slots, non-participating pixels and segments that cannot take part are zero rows (a NaN
        there never meets a zero factor). Kept for the backward: one copy of each operand."""
        if self.copies is None:
            plan = self.plan
            pad = self.block_d - embeddings.shape[1]
            pixels = F.pad(embeddings, (0, pad, 0, 1))[plan.pixel_index]     # index -1: the zero row appended
            kept = prototypes if plan.prototype_dropped is None else prototypes.masked_fill(plan.prototype_dropped, 0)
            placed = prototypes.new_zeros(plan.m_pad, self.block_d)
            placed[plan.prototype_slot, :prototypes.shape[1]] = kept
            norm = torch.linalg.vector_norm(placed, dim=1, dtype=torch.float32).amax(0, keepdim=True)
            self.copies = (pixels, placed, norm)
        return self.copies


def triton_other_segment_stats(embeddings, prototypes, inputs: LossInputs, prepared: TritonPlan):
    """(lse over S+ less the own segment, lse over S- less it, 1.0 where S+ less it is not empty, the own
    segment's logit), [N] float32 each; -inf for empty sets, 0 for pixels that do not participate."""
    from spml_fast.triton_kernels.pixel_segment_fwd import launch_pixel_segment_lse
    pixels, placed, norm = prepared.sorted_copies(embeddings, prototypes)
    return launch_pixel_segment_lse(pixels, placed, norm, prototypes, inputs.segment, prepared.plan, prepared.config,
                                    inputs.kappa).unbind(0)


def triton_other_segment_grads(embeddings, prototypes, inputs: LossInputs, prepared: TritonPlan, lse_positive,
                               lse_all, pixel_grad, own_grad):
    """(dE [N, D], dP [M, D], own [N]) float32 (pixel_grad [N] float32, 0 where the pixel does not take
    part; own_grad [N]: kappa dL/d(own logit)): dE whole, dP but for the own segments' rows, and ``own``,
    the own segment's coefficient that completes them (dP_own += own * e; ``launch_pixel_segment_grads``)."""
    from spml_fast.triton_kernels.pixel_segment_bwd import launch_pixel_segment_grads
    plan = prepared.plan
    pixels, placed, _ = prepared.sorted_copies(embeddings, prototypes)
    grad_embeddings, sorted_grad_prototypes, own = launch_pixel_segment_grads(
        pixels, placed, prototypes, inputs.segment, plan, prepared.config, inputs.kappa, lse_all, lse_positive,
        pixel_grad, own_grad)
    return grad_embeddings, sorted_grad_prototypes[plan.prototype_slot, :prototypes.shape[1]], own
