"""The Triton glue of the pixel-to-segment loss (``pixel_segment_loss``): the visit plan, sorted and
zero-padded copies of the operands and the kernel launches (``triton_kernels.pixel_segment_fwd`` and
``_bwd``). Device ops only, sizes from the shapes: no host synchronisation in a loss call.

Memory: the sorted copies ([n_pad, BLOCK_D] and [m_pad, BLOCK_D]), [n_pad, 4] float32 statistics and a
few [N] vectors; the kernels hold one BLOCK_N x BLOCK_M tile in registers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .contrast_plan import ContrastPlan, build_plan
from .dispatch import accumulation_dtype
from .loss_inputs import LossInputs

LN2 = 0.6931471805599453


@dataclass
class TritonPlan:
    plan: ContrastPlan
    config: object               # triton_kernels.configs.ContrastConfig
    block_d: int

    @staticmethod
    def build(embeddings: torch.Tensor, inputs: LossInputs) -> "TritonPlan":
        from spml_fast.triton_kernels.configs import contrast_config
        from spml_fast.triton_kernels.utils import block_dim
        block_d = block_dim(embeddings.shape[1])
        config = contrast_config(embeddings.device, block_d)
        labels = inputs.labels
        plan = build_plan(inputs.segment, labels.pixel, labels.prototype, labels.pixel_groups,
                          labels.prototype_groups, config.block_n, config.block_m)
        return TritonPlan(plan, config, block_d)

    def sorted_copies(self, embeddings: torch.Tensor, prototypes: torch.Tensor):
        """[n_pad, BLOCK_D] and [m_pad, BLOCK_D] copies in the plan's slots (the kernels read them without
        masks); empty slots, non-participating pixels and segments that cannot take part are zero rows (a
        NaN there never meets a zero factor)."""
        plan = self.plan

        def placed(source, slots, used, length):
            out = source.new_zeros(length, self.block_d)
            out[slots, :source.shape[1]] = source
            return out * used[:, None]
        return (placed(embeddings, plan.pixel_slot, plan.live_pixels, plan.n_pad),
                placed(prototypes, plan.prototype_slot, plan.kept_prototypes, plan.m_pad))


def triton_other_segment_stats(embeddings, prototypes, inputs: LossInputs, prepared: TritonPlan):
    """(lse over S+ less the own segment, lse over S- less it, 1.0 where S+ less it is not empty), [N]
    each in the accumulation dtype; -inf for empty sets."""
    from spml_fast.triton_kernels.pixel_segment_fwd import launch_pixel_segment_lse
    plan = prepared.plan
    stats = launch_pixel_segment_lse(*prepared.sorted_copies(embeddings, prototypes), plan, prepared.config,
                                     inputs.kappa)[plan.pixel_slot]                              # [N, 4]
    maxima, sums = stats[:, 0::2], stats[:, 1::2]
    lse = torch.where(sums > 0, (maxima + torch.log2(sums)) * LN2, float("-inf")).to(accumulation_dtype(embeddings))
    return lse[:, 0], lse[:, 1], (sums[:, 0] > 0).to(lse.dtype)


def triton_other_segment_grads(embeddings, prototypes, inputs: LossInputs, prepared: TritonPlan, lse_positive,
                               lse_all, pixel_grad):
    from spml_fast.triton_kernels.pixel_segment_bwd import launch_pixel_segment_grads
    from spml_fast.triton_kernels.utils import LOG2E
    plan = prepared.plan
    dtype = accumulation_dtype(embeddings)
    # the upstream gradient scaled into [-1, 1] (a device scalar: no read-back), undone at the end
    grad_scale = pixel_grad.abs().amax().clamp_min(torch.finfo(torch.float32).tiny).float()
    offset_all, offset_positive = lse_all.float() * LOG2E, lse_positive.float() * LOG2E
    upstream = pixel_grad.float() / grad_scale
    # positive pairs: exp2(l - lse_positive) * (exp2(lse_positive - lse_all) - 1), the factor in [-1, 0]
    factor_positive = upstream * torch.expm1((offset_positive - offset_all).clamp(max=0) * LN2)
    stats = torch.stack([offset_all, offset_positive, upstream, factor_positive], 1)
    live = plan.live_pixels[plan.pixel_slot][:, None]
    stats = torch.where(live, stats, 0.0)             # non-participating pixels (zero rows): 0, never NaN
    row_stats = stats.new_zeros(plan.n_pad, 4)
    row_stats[plan.pixel_slot] = stats
    sorted_grad_embeddings, sorted_grad_prototypes = launch_pixel_segment_grads(
        *prepared.sorted_copies(embeddings, prototypes), plan, prepared.config, inputs.kappa, row_stats)
    dim = embeddings.shape[1]
    scale = grad_scale * inputs.kappa
    return ((sorted_grad_embeddings[plan.pixel_slot, :dim] * scale).to(dtype),
            (sorted_grad_prototypes[plan.prototype_slot, :dim] * scale).to(dtype))
