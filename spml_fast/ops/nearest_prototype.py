"""Top-k nearest prototypes by cosine similarity, without an N x M tensor.

Used for the k-means E-step (k = 1), k-NN inference against a prototype bank
(a run's k) and the feature-affinity relation (top-k within an image). Not
differentiable (it returns indices and similarity values for voting).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _validate as check
from .dispatch import select_backend
from .tiling import DEFAULT, TileConfig

MAX_K = 256


def _torch_topk(embeddings, prototypes, k, pixel_groups, prototype_groups, tiles: TileConfig):
    """Chunked PyTorch path: each [chunk, M] similarity block is reduced by topk at once."""
    num_pixels = embeddings.shape[0]
    values = torch.empty(num_pixels, k, device=embeddings.device, dtype=torch.float32)
    indices = torch.empty(num_pixels, k, device=embeddings.device, dtype=torch.int64)
    prototypes_t = prototypes.float().t()
    step = tiles.pixel_chunk(num_pixels, prototypes.shape[0])
    for start in range(0, num_pixels, step):
        rows = slice(start, min(start + step, num_pixels))
        similarity = embeddings[rows].float() @ prototypes_t
        if pixel_groups is not None:
            similarity.masked_fill_(pixel_groups[rows, None] != prototype_groups[None, :], float("-inf"))
        if k == 1:  # argmax: the first (lowest-index) maximum, as the Triton kernel
            values[rows, 0] = similarity.amax(dim=1)
            indices[rows, 0] = similarity.argmax(dim=1)
        else:
            torch.topk(similarity, k, dim=1, out=(values[rows], indices[rows]))
    return values, indices


def nearest_prototype(embeddings: torch.Tensor, prototypes: torch.Tensor, k: int = 1,
                      pixel_groups: Optional[torch.Tensor] = None,
                      prototype_groups: Optional[torch.Tensor] = None,
                      *, backend: str = "auto", tiles: TileConfig = DEFAULT):
    """The k prototypes most similar to each pixel.

    Args:
        embeddings: [N, D] float; prototypes: [M, D] same dtype (cosine = dot
            product when both are L2-normalised).
        k: neighbours per pixel, 1 <= k <= min(M, 256).
        pixel_groups / prototype_groups: [N] / [M] integer, optional: only
            prototypes of the pixel's own group are eligible.
    Returns:
        (indices [N, k] int64, similarities [N, k] float32), best first, equal
        similarities in index order. For k = 1 a tie goes to the lowest index
        (deterministic k-means); for k > 1, which of several candidates tied at
        the k-th place is kept is unspecified. Where fewer than k prototypes are
        eligible the missing entries are index -1, similarity -inf.
    """
    check.check_matrix("embeddings", embeddings)
    check.check_matrix("prototypes", prototypes, cols=embeddings.shape[1])
    check.check_same_kind("prototypes", prototypes, "embeddings", embeddings)
    if not isinstance(k, int) or k < 1 or k > min(prototypes.shape[0], MAX_K):
        raise ValueError(f"k must be an int in [1, min(M, {MAX_K})] = [1, {min(prototypes.shape[0], MAX_K)}], got {k!r}")
    pixel_groups, prototype_groups = check.check_groups(pixel_groups, prototype_groups, embeddings.shape[0],
                                                        prototypes.shape[0], embeddings.device)
    with torch.no_grad():
        if select_backend(backend, embeddings) == "triton":
            from spml_fast.triton_kernels.nearest_prototype import launch_nearest_prototype
            values, indices = launch_nearest_prototype(embeddings, prototypes, k, pixel_groups, prototype_groups)
        else:
            values, indices = _torch_topk(embeddings, prototypes, k, pixel_groups, prototype_groups, tiles)
        # Sort best first; among equal values the lower index first (stable sort on index order).
        by_index = torch.argsort(torch.where(indices < 0, indices.new_full((), 2**62), indices), dim=1)
        values, indices = values.gather(1, by_index), indices.gather(1, by_index)
        order = torch.sort(values, dim=1, descending=True, stable=True).indices
        values, indices = values.gather(1, order), indices.gather(1, order)
        indices = indices.masked_fill(values == float("-inf"), -1)
    return indices, values
