"""Dense reference implementations (the paper's formulation), for tests and
benchmarks only.

They materialise the N x M similarity matrix and N x M membership masks, as
SPML's released code does. Memory: several N*M*4-byte tensors (about 1 GB
each at N = 65,536, M = 4,096), all kept alive for autograd.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .membership import membership, participating_pixels, reduce_pixel_losses


def pixel_segment_loss_dense(embeddings, prototypes, segment, pixel_labels, prototype_labels, kappa,
                             pixel_groups=None, prototype_groups=None, reduction="mean") -> torch.Tensor:
    """docs/method.md, the loss written out densely: embeddings [N, D], prototypes [M, D] -> loss (float32)."""
    logits = kappa * embeddings.float() @ prototypes.float().t()                  # [N, M]
    positive, negative = membership(pixel_labels, prototype_labels, pixel_groups, prototype_groups)
    own = F.one_hot(segment, prototypes.shape[0]).bool()                          # [N, M]
    positive_other = positive & ~own
    has_other = positive_other.any(1, keepdim=True)
    positive_set = torch.where(has_other, positive_other, own)                     # segsort+ rule
    negative_set = negative & ~own
    neg_inf = torch.finfo(torch.float32).min  # finite fill keeps autograd free of inf - inf
    lse_positive = logits.masked_fill(~positive_set, neg_inf).logsumexp(1)
    lse_all = logits.masked_fill(~(positive_set | negative_set), neg_inf).logsumexp(1)
    participating = participating_pixels(pixel_labels)
    per_pixel = (lse_all - lse_positive) * participating
    return reduce_pixel_losses(per_pixel, participating, reduction)


def segment_prototypes_dense(embeddings: torch.Tensor, segment: torch.Tensor, num_segments: int) -> torch.Tensor:
    """One-hot [N, M] matrix product, then L2 normalisation: [M, D] float32."""
    one_hot = F.one_hot(segment, num_segments).to(torch.float32)
    return F.normalize(one_hot.t() @ embeddings.float(), dim=1)


def nearest_prototype_dense(embeddings, prototypes, k=1, pixel_groups=None, prototype_groups=None):
    """Full [N, M] cosine matrix then topk: (indices [N, k] int64, similarities [N, k] float32)."""
    similarity = embeddings.float() @ prototypes.float().t()
    if pixel_groups is not None:
        similarity = similarity.masked_fill(pixel_groups[:, None] != prototype_groups[None, :], float("-inf"))
    values, indices = similarity.topk(k, dim=1)
    return indices.masked_fill(values == float("-inf"), -1), values
