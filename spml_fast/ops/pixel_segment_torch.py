"""The tiled PyTorch engine of the pixel-to-segment loss (``pixel_segment_loss``): the streamed
other-segment statistics and their gradients, a [chunk, M] block at a time. The CPU path, and the
reference the Triton kernels are tested against beside the dense float64 oracle.

Memory: one [chunk, M] float32 logits tile per pass (chunk sized by ``TileConfig.chunk_bytes``) and a
few [N] vectors; no N x M tensor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .dispatch import accumulation_dtype
from .loss_inputs import LossInputs
from . import _validate as check
from .membership import membership, participating_pixels, row_ids


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
    """Tiled PyTorch forward: (lse_positive_other, lse_negative, num_positive_other, own_logit), [N] each, in
    the accumulation dtype; non-participating pixels get (-inf, -inf, 0, their own logit)."""
    num_pixels, dtype = embeddings.shape[0], accumulation_dtype(embeddings)
    own_logit = (embeddings.to(dtype) * prototypes.index_select(0, inputs.segment).to(dtype)).sum(1) * inputs.kappa
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
    return lse_positive, lse_negative, num_positive, own_logit


SAFE_GAP = 60.0     # lse_all - lse_positive above this: 1 - exp(gap) would overflow next to exp(l - lse_all)


def torch_other_segment_grads(embeddings, prototypes, inputs: LossInputs, types: PixelTypes,
                              lse_positive, lse_all, pixel_grad, own_grad):
    """Tiled PyTorch backward: (dE [N, D], dP [M, D], own [N]) in the accumulation dtype, as the kernels
    return them: dE whole (own_grad [N]: kappa dL/d(own logit)), dP over the non-own segments, and
    own = pixel_grad * own_grad, the own segment's coefficient for the caller (dP_own += own * e).

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
    own = pixel_grad * own_grad
    grad_embeddings.addcmul_(own[:, None], prototypes.index_select(0, inputs.segment).to(dtype))
    return grad_embeddings, grad_prototypes, own
