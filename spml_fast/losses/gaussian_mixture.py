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

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GaussianMixtureConfig:
    embedding_weight: float = 1.0    # feature blocks, each scaled before the Gaussian
    colour_weight: float = 1.0       # rgb in [0, 1]
    position_weight: float = 1.0     # (y, x) in [0, 1]
    min_std: float = 0.05            # floor of a component's standard deviation per dimension


def mixture_features(embeddings: torch.Tensor, colours: torch.Tensor, config: GaussianMixtureConfig) -> torch.Tensor:
    """embeddings [B, D, h, w], colours [B, 3, h, w] -> features [B, h*w, D + 5] float32."""
    batch, _, height, width = embeddings.shape
    ys = (torch.arange(height, device=embeddings.device, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, device=embeddings.device, dtype=torch.float32) + 0.5) / width
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij"))[None].expand(batch, -1, -1, -1)
    features = torch.cat([config.embedding_weight * embeddings.detach().float(),
                          config.colour_weight * colours.float(), config.position_weight * grid], 1)
    return features.flatten(2).transpose(1, 2)


def mixture_targets(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                    min_std: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """features [B, P, F], labels [B, P] int64 (-1 unlabelled) -> (targets [B, P, K] float32, rows sum
    to 1 where the image has a component, else 0; has_component [B] bool)."""
    one_hot = torch.nn.functional.one_hot(labels.clamp(min=0), num_classes).float() * (labels >= 0)[..., None]
    counts = one_hot.sum(1)                                                     # [B, K]
    present = counts > 0
    mean = torch.einsum("bpk,bpf->bkf", one_hot, features) / counts.clamp(min=1)[..., None]
    square = torch.einsum("bpk,bpf->bkf", one_hot, features * features) / counts.clamp(min=1)[..., None]
    std = (square - mean * mean).clamp(min=0).sqrt().clamp(min=min_std)        # [B, K, F]
    # log response of pixel p to component k: -0.5 mean_f ((x - mu) / sigma)^2
    scaled = (features[:, :, None, :] - mean[:, None]) / std[:, None]           # [B, P, K, F]
    log_response = -0.5 * scaled.pow(2).mean(-1)
    log_response = log_response.masked_fill(~present[:, None, :], float("-inf"))
    has_component = present.any(1)
    targets = torch.where(has_component[:, None, None], log_response.softmax(-1).nan_to_num(0.0),
                          torch.zeros_like(log_response))
    return targets, has_component


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
    chosen = (labels < 0) & valid
    chosen = chosen.reshape(batch, -1) & has_component[:, None]
    if not bool(chosen.any()):
        return predicted.sum() * 0
    return (predicted[chosen] - targets[chosen]).abs().sum(1).mean()
