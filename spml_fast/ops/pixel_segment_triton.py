"""The Triton glue of the pixel-to-segment loss (``pixel_segment_loss``): the visit plan, sorted and
zero-padded copies of the operands, the kernel launches (``triton_kernels.pixel_segment_fwd`` and
``_bwd``) and the exact fallback for sets that underflow under the kernels' shared max.

Memory: the sorted copies ([n_pad, BLOCK_D] and [m_pad, BLOCK_D]) and a few [N] vectors; the kernels
hold one BLOCK_N x BLOCK_M tile in registers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .contrast_plan import ContrastPlan, build_plan
from .dispatch import accumulation_dtype
from .loss_inputs import LossInputs
from .membership import membership


# --------------------------------------------------------------------------
# Triton path (CUDA, or CPU through TRITON_INTERPRET=1): the kernels run the
# visit plan of ``contrast_plan`` on sorted, zero-padded copies of the
# participating pixels and the segments that can take part.
# --------------------------------------------------------------------------
LN2 = 0.6931471805599453
UNDERFLOW = 2.0 ** -102      # a set's sum below this under the shared max has lost precision: redo it exactly


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
        """[n_pad, BLOCK_D] and [m_pad, BLOCK_D] zero-padded copies in the plan's order (the kernels read
        them without masks); empty slots are zero rows."""
        plan = self.plan
        def placed(rows, slots, source, length):
            out = source.new_zeros(length, self.block_d)
            out[slots, :source.shape[1]] = source.index_select(0, rows)
            return out
        return (placed(plan.pixel_rows, plan.pixel_slots, embeddings, plan.n_pad),
                placed(plan.prototype_rows, plan.prototype_slots, prototypes, plan.m_pad))


def _exact_set_lse(embeddings, prototypes, inputs: LossInputs, plan, sorted_rows: torch.Tensor):
    """Exact (lse_positive_other, lse_negative) of a few sorted pixels, each set with its own max:
    the fallback for sets that underflowed under the kernels' shared max. Chunked: [chunk, m] at a time."""
    labels = inputs.labels
    rows = plan.pixel_rows[sorted_rows]
    kept = plan.prototype_rows
    dtype = accumulation_dtype(embeddings)
    scaled = prototypes.index_select(0, kept).to(dtype) * inputs.kappa
    results = ([], [])
    step = max(1, (1 << 22) // max(1, kept.shape[0]))
    for start in range(0, rows.shape[0], step):
        chunk = rows[start:start + step]
        positive, negative = membership(labels.pixel[chunk], labels.prototype[kept],
                                        None if labels.pixel_groups is None else labels.pixel_groups[chunk],
                                        None if labels.prototype_groups is None else labels.prototype_groups[kept])
        not_own = kept[None, :] != inputs.segment[chunk][:, None]
        logits = embeddings[chunk].to(dtype) @ scaled.t()
        for index, mask in enumerate((positive & not_own, negative & not_own)):
            results[index].append(logits.masked_fill(~mask, float("-inf")).logsumexp(dim=1))
    return torch.cat(results[0]), torch.cat(results[1])


def triton_other_segment_stats(embeddings, prototypes, inputs: LossInputs, prepared: TritonPlan):
    from spml_fast.triton_kernels.pixel_segment_fwd import launch_pixel_segment_lse
    plan = prepared.plan
    num_pixels, dtype = embeddings.shape[0], accumulation_dtype(embeddings)
    lse_positive = torch.full((num_pixels,), float("-inf"), device=embeddings.device, dtype=dtype)
    lse_negative, num_positive = lse_positive.clone(), torch.zeros_like(lse_positive)
    n = plan.num_pixels
    if n == 0 or plan.num_prototypes == 0:
        return lse_positive, lse_negative, num_positive
    sorted_embeddings, sorted_prototypes = prepared.sorted_copies(embeddings, prototypes)
    running_max, sum_positive, sum_negative = (value[plan.pixel_slots] for value in launch_pixel_segment_lse(
        sorted_embeddings, sorted_prototypes, plan, prepared.config, inputs.kappa))
    def natural_lse(total):                     # log2 units -> natural log; an empty set is -inf
        return torch.where(total > 0, (running_max + torch.log2(total.clamp_min(UNDERFLOW * 2.0 ** -40))) * LN2,
                           float("-inf"))
    positive, negative = natural_lse(sum_positive), natural_lse(sum_negative)
    redo = (((plan.positive_count > 0) & (sum_positive < UNDERFLOW)) |
            ((plan.negative_count > 0) & (sum_negative < UNDERFLOW))).nonzero()[:, 0]
    if redo.numel():
        positive[redo], negative[redo] = _exact_set_lse(embeddings, prototypes, inputs, plan, redo)
    lse_positive[plan.pixel_rows] = positive.to(dtype)
    lse_negative[plan.pixel_rows] = negative.to(dtype)
    num_positive[plan.pixel_rows] = plan.positive_count.to(dtype)
    return lse_positive, lse_negative, num_positive


def triton_other_segment_grads(embeddings, prototypes, inputs: LossInputs, prepared: TritonPlan, lse_positive,
                               lse_all, pixel_grad):
    from spml_fast.triton_kernels.pixel_segment_bwd import launch_pixel_segment_grads
    from spml_fast.triton_kernels.utils import LOG2E
    plan = prepared.plan
    dtype = accumulation_dtype(embeddings)
    grad_embeddings = torch.zeros(embeddings.shape, device=embeddings.device, dtype=dtype)
    grad_prototypes = torch.zeros(prototypes.shape, device=embeddings.device, dtype=dtype)
    grad_scale = float(pixel_grad.abs().max()) if pixel_grad.numel() else 0.0
    n = plan.num_pixels
    if n == 0 or plan.num_prototypes == 0 or grad_scale == 0.0:
        return grad_embeddings, grad_prototypes
    rows = plan.pixel_rows
    offset_all = lse_all[rows].float() * LOG2E
    offset_positive = lse_positive[rows].float() * LOG2E
    upstream = pixel_grad[rows].float() / grad_scale
    # positive pairs: exp2(l - lse_positive) * (exp2(lse_positive - lse_all) - 1), the factor in [-1, 0]
    factor_positive = upstream * torch.expm1((offset_positive - offset_all).clamp(max=0) * LN2)
    row_stats = torch.zeros(plan.n_pad, 4, device=embeddings.device, dtype=torch.float32)   # empty slots: 0
    row_stats[plan.pixel_slots] = torch.stack([offset_all, offset_positive, upstream, factor_positive], 1)
    sorted_embeddings, sorted_prototypes = prepared.sorted_copies(embeddings, prototypes)
    sorted_grad_embeddings, sorted_grad_prototypes = launch_pixel_segment_grads(
        sorted_embeddings, sorted_prototypes, plan, prepared.config, inputs.kappa, row_stats)
    dim = embeddings.shape[1]
    scale = inputs.kappa * grad_scale
    grad_embeddings[rows] = sorted_grad_embeddings[plan.pixel_slots, :dim].to(dtype) * scale
    grad_prototypes[plan.prototype_rows] = sorted_grad_prototypes[plan.prototype_slots, :dim].to(dtype) * scale
    return grad_embeddings, grad_prototypes
