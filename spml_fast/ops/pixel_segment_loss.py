"""The pixel-to-segment contrastive loss (docs/method.md, the loss): autograd wrapper, tiled
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
from .contrast_plan import ContrastPlan, build_plan
from .dispatch import accumulation_dtype, select_backend
from .membership import membership, participating_pixels, reduce_pixel_losses, row_ids
from .tiling import DEFAULT, TileConfig


@dataclass(frozen=True)
class LossInputs:
    """Everything of a loss call except the two differentiable tensors."""

    segment: torch.Tensor              # [N] int64 in [0, M)
    labels: check.Labels
    kappa: float
    tiles: TileConfig = DEFAULT


# --------------------------------------------------------------------------
# Tiled PyTorch path.
#
# Membership depends on a pixel only through its *type*: (class id, group) or
# (class set, group). A batch has few types (classes x images), so the
# participating pixels are sorted by type and processed in chunks of
# ``TileConfig.pixel_chunk`` rows; a chunk's masks are one [M] row per type
# (broadcast when the chunk holds a single type). Per chunk and pass the work
# is one [chunk, M] logits tile and a few in-place passes over it: no mask
# tile is built in the common case, and unlabelled pixels cost nothing.
# --------------------------------------------------------------------------
@dataclass
class PixelTypes:
    """Participating pixels sorted by type, and the labels of each type."""

    order: torch.Tensor                    # [P] int64 pixel indices, sorted by type
    type_of: torch.Tensor                  # [P] int64 type of each pixel in ``order`` (non-decreasing)
    labels: torch.Tensor                   # [T] class ids or [T, W] bit sets
    groups: Optional[torch.Tensor]         # [T] or None

    @staticmethod
    def build(labels: check.Labels) -> "PixelTypes":
        rows = participating_pixels(labels.pixel).nonzero().squeeze(1)
        key = labels.pixel[rows] if labels.set_mode else labels.pixel[rows, None]
        if labels.pixel_groups is not None:
            key = torch.cat([key, labels.pixel_groups[rows, None]], dim=1)
        type_of = row_ids(key)
        order = torch.argsort(type_of, stable=True)
        num_types = int(type_of.max()) + 1 if type_of.numel() else 0
        first_row = torch.full((num_types,), key.shape[0], dtype=torch.int64, device=key.device)
        first_row.scatter_reduce_(0, type_of, torch.arange(key.shape[0], device=key.device), reduce="amin")
        representative = key[first_row]                                              # [T, W (+1)]
        width = labels.num_words
        type_labels = representative[:, :width] if labels.set_mode else representative[:, 0]
        type_groups = representative[:, width] if labels.pixel_groups is not None else None
        return PixelTypes(rows[order], type_of[order], type_labels, type_groups)

    def chunks(self, inputs: LossInputs, num_prototypes: int):
        """Yield a ``Chunk`` per block of at most ``TileConfig.pixel_chunk`` type-sorted pixels."""
        labels = inputs.labels
        step = inputs.tiles.pixel_chunk(max(1, self.order.shape[0]), num_prototypes)
        cached_range, cached = None, None
        for start in range(0, self.order.shape[0], step):
            types = self.type_of[start:start + step]
            type_range = (int(types[0]), int(types[-1]))
            if type_range != cached_range:   # consecutive chunks usually share their types
                cached_range, cached = type_range, self._columns(type_range, labels, num_prototypes)
            positive, negative, columns, column_of = cached
            if type_range[0] != type_range[1]:
                local = types - type_range[0]
                positive, negative = positive[local], negative[local]
            rows = self.order[start:start + step]
            own = inputs.segment[rows] if column_of is None else column_of[inputs.segment[rows]]
            yield Chunk(rows, own, positive, negative, columns)

    def _columns(self, type_range, labels: check.Labels, num_prototypes: int):
        """Membership rows of types [first, last] restricted to the segments any of them uses."""
        first, last = type_range
        positive, negative = membership(
            self.labels[first:last + 1], labels.prototype,
            None if self.groups is None else self.groups[first:last + 1], labels.prototype_groups)
        eligible = (positive | negative).any(0)
        if bool(eligible.all()):
            return positive, negative, None, None
        columns = eligible.nonzero()[:, 0]
        column_of = torch.full((num_prototypes,), -1, dtype=torch.int64, device=columns.device)
        column_of[columns] = torch.arange(columns.shape[0], device=columns.device)
        return positive[:, columns], negative[:, columns], columns, column_of


@dataclass
class Chunk:
    """A block of type-sorted pixels and the segments its types take part with."""

    rows: torch.Tensor                 # [C] pixel indices
    own: torch.Tensor                  # [C] column of each pixel's own segment, -1 if not among the columns
    positive: torch.Tensor             # [1 or C, M_c] bool (one broadcast row for a single-type chunk)
    negative: torch.Tensor             # [1 or C, M_c] bool
    columns: Optional[torch.Tensor]    # [M_c] segment indices; None = all M

    def prototypes(self, prototypes: torch.Tensor) -> torch.Tensor:
        return prototypes if self.columns is None else prototypes.index_select(0, self.columns)


class _ColumnCache:
    """The (scaled) prototypes of the previous chunk's columns, reused while they stay the same."""

    def __init__(self, prototypes: torch.Tensor):
        self.prototypes, self.columns, self.selected = prototypes, None, prototypes

    def get(self, chunk: Chunk) -> torch.Tensor:
        if chunk.columns is not self.columns:
            self.columns, self.selected = chunk.columns, chunk.prototypes(self.prototypes)
        return self.selected


def _row_sums(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum_s values[i, s] * mask[., s] -> [C]; a matrix-vector product for a broadcast mask row."""
    if mask.shape[0] == 1:
        return values @ mask[0].to(values.dtype)
    return (values * mask).sum(1)


def _member_counts(mask: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """Members per row of ``mask`` ([1 or C, M_c]) other than the row's own segment: [C] int64."""
    own_column = own.clamp_min(0)
    own_member = (mask[0, own_column] if mask.shape[0] == 1 else mask.gather(1, own_column[:, None])[:, 0])
    return mask.sum(1).expand(own.shape[0]) - (own_member & (own >= 0)).long()


def _logits_without_own(pixels: torch.Tensor, scaled_prototypes: torch.Tensor, own: torch.Tensor):
    """kappa * <e_i, p_s> as [C, M_c], with -inf at each row's own segment (when among the columns)."""
    logits = pixels @ scaled_prototypes.t()
    has_own = own >= 0
    logits[has_own.nonzero()[:, 0], own[has_own]] = float("-inf")
    return logits


def _exact_lse(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return logits.masked_fill(~mask, float("-inf")).logsumexp(dim=1)


def torch_other_segment_stats(embeddings, prototypes, inputs: LossInputs, types: PixelTypes):
    """Tiled PyTorch forward: (lse_positive_other, lse_negative, num_positive_other), [N] each, in the
    accumulation dtype; non-participating pixels get (-inf, -inf, 0)."""
    num_pixels, dtype = embeddings.shape[0], accumulation_dtype(embeddings)
    scaled = _ColumnCache(prototypes.to(dtype) * inputs.kappa)
    lse_positive = torch.full((num_pixels,), float("-inf"), device=embeddings.device, dtype=dtype)
    lse_negative, num_positive = lse_positive.clone(), torch.zeros_like(lse_positive)
    tiny = torch.finfo(dtype).tiny * 2**24   # below this a sum has lost precision: redo the row exactly
    for chunk in types.chunks(inputs, prototypes.shape[0]):
        if chunk.positive.shape[1] == 0:        # no segment takes part for these pixels: -inf, -inf, 0
            continue
        pixels = embeddings[chunk.rows].to(dtype)
        chunk_prototypes = scaled.get(chunk)
        logits = _logits_without_own(pixels, chunk_prototypes, chunk.own)
        shift = logits.amax(dim=1, keepdim=True)
        shift.masked_fill_(torch.isinf(shift), 0.0)
        exp_logits = logits.sub_(shift).exp_()                                     # in place, [C, M_c]
        sums = (_row_sums(exp_logits, chunk.positive), _row_sums(exp_logits, chunk.negative))
        counts = (_member_counts(chunk.positive, chunk.own), _member_counts(chunk.negative, chunk.own))
        lse = [torch.where(total > 0, shift[:, 0] + total.clamp_min(tiny).log(), float("-inf")) for total in sums]
        # One shift for both sets: a set far below the row's max may underflow; recompute it exactly.
        redo = ((counts[0] > 0) & (sums[0] < tiny)) | ((counts[1] > 0) & (sums[1] < tiny))
        if bool(redo.any()):
            exact = _logits_without_own(pixels[redo], chunk_prototypes, chunk.own[redo])
            for index, mask in enumerate((chunk.positive, chunk.negative)):
                lse[index][redo] = _exact_lse(exact, mask[redo] if mask.shape[0] > 1 else mask)
        lse_positive[chunk.rows], lse_negative[chunk.rows] = lse
        num_positive[chunk.rows] = counts[0].to(dtype)
    return lse_positive, lse_negative, num_positive


SAFE_GAP = 60.0     # lse_all - lse_positive above this: 1 - exp(gap) would overflow next to exp(l - lse_all)


def torch_other_segment_grads(embeddings, prototypes, inputs: LossInputs, types: PixelTypes,
                              lse_positive, lse_all, pixel_grad):
    """Tiled PyTorch backward over the non-own segments: (dE [N, D], dP [M, D]) in the accumulation dtype.

    dL/dlogit(i, s) = g_i exp(l_is - lse_all_i) on negatives and
    g_i exp(l_is - lse_all_i) (1 - exp(lse_all_i - lse_positive_i)) on positives (softmax over S+ u S-
    minus softmax over S+). Where the positive set is more than ``SAFE_GAP`` below the total, the second
    factor would overflow while the first underflows (0 x inf): those rows use the bounded form
    g_i exp(l_is - lse_positive_i) (exp(lse_positive_i - lse_all_i) - 1), as the kernels do."""
    dtype = accumulation_dtype(embeddings)
    scaled = _ColumnCache(prototypes.to(dtype) * inputs.kappa)
    grad_embeddings = torch.zeros(embeddings.shape, device=embeddings.device, dtype=dtype)
    grad_prototypes = torch.zeros(prototypes.shape, device=embeddings.device, dtype=dtype)
    gap = lse_all - lse_positive
    safe = gap <= SAFE_GAP
    positive_weight = pixel_grad * -torch.expm1(torch.where(safe, gap, torch.zeros_like(gap)))
    bounded_factor = pixel_grad * torch.expm1(-gap.clamp(min=0))                     # in [-g, 0]
    for chunk in types.chunks(inputs, prototypes.shape[0]):
        if chunk.positive.shape[1] == 0:
            continue
        pixels = embeddings[chunk.rows].to(dtype)
        chunk_prototypes = scaled.get(chunk)
        logits = _logits_without_own(pixels, chunk_prototypes, chunk.own)
        unsafe = ~safe[chunk.rows]
        if bool(unsafe.any()):                 # rare: recompute those rows' positive entries bounded
            rows = chunk.rows[unsafe]
            positive_rows = chunk.positive[unsafe] if chunk.positive.shape[0] > 1 else chunk.positive
            bounded = (logits[unsafe] - lse_positive[rows, None]).clamp_(max=0).exp_() * bounded_factor[rows, None]
        grad_logits = logits.sub_(lse_all[chunk.rows, None]).clamp_(max=0).exp_()       # in place, [C, M_c]
        weights = torch.where(chunk.positive, positive_weight[chunk.rows, None],
                              pixel_grad[chunk.rows, None] * chunk.negative)
        grad_logits.mul_(weights)
        if bool(unsafe.any()):
            grad_logits[unsafe] = torch.where(positive_rows, bounded, grad_logits[unsafe])
        grad_embeddings[chunk.rows] = grad_logits @ chunk_prototypes
        if chunk.columns is None:
            grad_prototypes.addmm_(grad_logits.t(), pixels, alpha=inputs.kappa)
        else:
            grad_prototypes.index_add_(0, chunk.columns, grad_logits.t() @ pixels, alpha=inputs.kappa)
    return grad_embeddings, grad_prototypes


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
        lse_positive_other, lse_negative, num_positive_other = stats(embeddings, prototypes, inputs, prepared)
        dtype = accumulation_dtype(embeddings)
        own_logit = inputs.kappa * torch.einsum(
            "nd,nd->n", embeddings.to(dtype), prototypes.to(dtype).index_select(0, inputs.segment))
        has_other_positive = num_positive_other > 0
        lse_positive = torch.where(has_other_positive, lse_positive_other, own_logit)
        lse_all = torch.logaddexp(lse_positive, lse_negative)
        participating = participating_pixels(inputs.labels.pixel)
        zero = torch.zeros_like(lse_all)
        # where, not a multiplication: a non-participating pixel (NaN embedding, say) never reaches the mean
        per_pixel = torch.where(participating, lse_all - lse_positive, zero)          # [N] accumulation dtype
        # d L / d own_logit: the own segment is in S+ only when no other positive exists.
        own_grad = torch.where(participating & ~has_other_positive, torch.exp(own_logit - lse_all) - 1.0, zero)
        ctx.save_for_backward(embeddings, prototypes, lse_positive, lse_all, own_grad, participating)
        ctx.inputs, ctx.backend, ctx.prepared = inputs, backend, prepared
        return per_pixel

    @staticmethod
    def backward(ctx, grad_per_pixel):
        embeddings, prototypes, lse_positive, lse_all, own_grad, participating = ctx.saved_tensors
        inputs = ctx.inputs
        _, _, grads = _PATHS[ctx.backend]
        dtype = accumulation_dtype(embeddings)
        pixel_grad = torch.where(participating, grad_per_pixel.to(dtype), 0.0).contiguous()
        grad_embeddings, grad_prototypes = grads(embeddings, prototypes, inputs, ctx.prepared,
                                                 lse_positive, lse_all, pixel_grad)
        own_scale = (inputs.kappa * pixel_grad * own_grad)[:, None]                # [N, 1]
        grad_embeddings += own_scale * prototypes.to(dtype).index_select(0, inputs.segment)
        own_terms = torch.where(participating[:, None], own_scale * embeddings.to(dtype), 0.0)
        grad_prototypes.index_add_(0, inputs.segment, own_terms)
        return grad_embeddings.to(embeddings.dtype), grad_prototypes.to(prototypes.dtype), None, None


def pixel_segment_loss(embeddings: torch.Tensor, prototypes: torch.Tensor, segment: torch.Tensor,
                       pixel_labels: torch.Tensor, prototype_labels: torch.Tensor, kappa: float = 10.0,
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
