"""The adaptive Gaussian-mixture loss (AGMM; Wu et al., CVPR 2023) for
sparse labels.

In each image, every class with labelled pixels becomes one Gaussian
component: the mean and the per-dimension standard deviation of its
labelled pixels' features (the embedding, the colour and the position,
each block weighted). An unlabelled pixel's responses to the components of
its image, normalised over them, are its soft target (no gradient); the
loss is the mean over unlabelled pixels of sum_k |P_k - G_k|, P the head's
class probabilities. Classes without labelled pixels in an image take no
part in it; an image with none contributes nothing.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GaussianMixtureConfig:
    embedding_weight: float = 1.0    # feature blocks, each scaled before the Gaussian
    colour_weight: float = 1.0       # rgb in [0, 1]
    position_weight: float = 1.0     # (y, x) in [0, 1]
    min_std: float = 0.05            # floor of a component's standard deviation per dimension


@functools.lru_cache(maxsize=8)
def pixel_positions(height: int, width: int, device: torch.device) -> torch.Tensor:
    """[2, h, w] float32: each pixel centre's (y, x) in [0, 1]. Cached: a constant per grid and device."""
    rows = (torch.arange(height, dtype=torch.float32, device=device) + 0.5) / height
    cols = (torch.arange(width, dtype=torch.float32, device=device) + 0.5) / width
    return torch.stack(torch.meshgrid(rows, cols, indexing="ij"))


def _weighted(tensor: torch.Tensor, weight: float) -> torch.Tensor:
    return tensor if weight == 1 else weight * tensor


def mixture_features(embeddings: torch.Tensor, colours: torch.Tensor, config: GaussianMixtureConfig) -> torch.Tensor:
    """embeddings [B, D, h, w], colours [B, 3, h, w] -> features [B, h*w, D + 5] float32."""
    batch, _, height, width = embeddings.shape
    position = pixel_positions(height, width, embeddings.device).expand(batch, -1, -1, -1)
    features = torch.cat([_weighted(embeddings.float(), config.embedding_weight),
                          _weighted(colours.float(), config.colour_weight),
                          _weighted(position, config.position_weight)], 1)
    return features.flatten(2).transpose(1, 2)


def mixture_targets(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                    min_std: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """features [B, P, F], labels [B, P] int64 (-1 unlabelled) -> (targets [B, P, K] float32, rows sum
    to 1 where the image has a component, else 0; has_component [B] bool).

    A handful of [B, P, 2F] x [B, 2F, K] products, no [B, P, K, F] tensor and no host sync:
    the per-class moments [x^2, x] are one_hot^T @ [x^2, x], and the log response of pixel p to
    component k, -0.5 mean_f ((x - mu) / s)^2, is -0.5 / F ([x^2, x] @ [1 / s^2, -2 mu / s^2]^T +
    sum_f mu^2 / s^2) with s^2 = max(variance, min_std^2)."""
    dims = features.shape[-1]
    one_hot = (labels[..., None] == torch.arange(num_classes, device=labels.device)).float()   # -1: a zero row
    counts = one_hot.sum(1)                                                     # [B, K]
    powers = torch.cat([features * features, features], -1)                   # [B, P, 2F]
    moments = torch.bmm(one_hot.transpose(1, 2), powers) / counts.clamp(min=1)[..., None]
    square, mean = moments[..., :dims], moments[..., dims:]                   # [B, K, F] each
    inverse = (square - mean * mean).clamp(min=min_std * min_std).reciprocal()
    spread = torch.baddbmm((mean * mean * inverse).sum(-1)[:, None, :], powers,
                           torch.cat([inverse, -2 * mean * inverse], -1).transpose(1, 2))
    present = counts > 0
    # classes without labelled pixels get -inf; an image without any: a row of NaN, zeroed
    targets = (spread * (-0.5 / dims)).masked_fill(~present[:, None, :], float("-inf")).softmax(-1).nan_to_num(0.0)
    return targets, present.any(1)
def gaussian_mixture_loss(probabilities: torch.Tensor, embeddings: torch.Tensor, colours: torch.Tensor,
                          labels: torch.Tensor, valid: torch.Tensor,
                          config: GaussianMixtureConfig = GaussianMixtureConfig()) -> torch.Tensor:
    """probabilities [B, K, h, w] (with gradient), embeddings [B, D, h, w], colours [B, 3, h, w] in
    [0, 1], labels [B, h, w] int64 (-1 unlabelled), valid [B, h, w] bool -> float32 scalar."""
    batch, classes = probabilities.shape[:2]
    flat_labels = torch.where(valid, labels, torch.full_like(labels, -1)).reshape(batch, -1)
    with torch.no_grad():
        targets, has_component = mixture_targets(mixture_features(embeddings, colours, config), flat_labels,
                                                  classes, config.min_std)
    predicted = probabilities.float().flatten(2).transpose(1, 2)                # [B, P, K]
    chosen = ((labels < 0) & valid).reshape(batch, -1) & has_component[:, None]
    chosen = chosen.float()
    # the mean over the chosen pixels without asking the host whether there are any (0 if none)
    return ((predicted - targets).abs().sum(2) * chosen).sum() / chosen.sum().clamp(min=1.0)
