"""Dense CRF post-processing of class scores (Krähenbühl & Koltun, 2011),
through pydensecrf2 (the maintained build of the authors' code).

Unary: -log of the predictor's class scores. Pairwise Potts terms: a
smoothness kernel on position and an appearance kernel on position and
colour, so that neighbouring pixels of similar colour take the same label;
mean-field inference for ``iterations`` steps. Sigmas are in pixels of the
image as predicted and in colour levels (0-255).

``mean_field_reference`` is the same model computed exactly (an N x N
kernel, tiny images only): the tests hold the package against it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

PROBABILITY_FLOOR = 1e-5          # k-NN votes have exact zeros: -log needs a floor


@dataclass(frozen=True)
class CrfConfig:
    enabled: bool = False
    iterations: int = 5
    position_sigma: float = 3.0       # smoothness kernel
    position_weight: float = 3.0
    bilateral_sigma: float = 50.0     # appearance kernel: position ...
    colour_sigma: float = 10.0        # ... and colour
    bilateral_weight: float = 6.0

    def __post_init__(self):
        if self.iterations < 1:
            raise ValueError(f"crf.iterations must be >= 1, got {self.iterations}")
        for name in ("position_sigma", "bilateral_sigma", "colour_sigma"):
            if not getattr(self, name) > 0:
                raise ValueError(f"crf.{name} must be > 0, got {getattr(self, name)}")


def _require_pydensecrf():
    try:
        import pydensecrf.densecrf as densecrf
    except ImportError:
        raise RuntimeError("dense CRF needs pydensecrf2 (pip install pydensecrf2), or turn it off "
                           "(train --set crf.enabled=false, or --crf off on eval and predict)") from None
    return densecrf


def unary(scores: np.ndarray) -> np.ndarray:
    """scores [K, H, W] (rows sum to ~1) -> energies [K, H*W] float32: -log of the floored, renormalised scores."""
    probabilities = np.clip(scores.astype(np.float64), PROBABILITY_FLOOR, None)
    probabilities /= probabilities.sum(0, keepdims=True)
    return np.ascontiguousarray(-np.log(probabilities).reshape(scores.shape[0], -1).astype(np.float32))


def refine(scores: np.ndarray, image: np.ndarray, config: CrfConfig) -> np.ndarray:
    """scores [K, H, W] float, image uint8 [H, W, 3] -> refined marginals [K, H, W] float32."""
    densecrf = _require_pydensecrf()
    classes, height, width = scores.shape
    if image.shape != (height, width, 3):
        raise ValueError(f"crf: image is {image.shape}, scores are {scores.shape}")
    model = densecrf.DenseCRF2D(width, height, classes)
    model.setUnaryEnergy(unary(scores))
    model.addPairwiseGaussian(sxy=config.position_sigma, compat=config.position_weight)
    model.addPairwiseBilateral(sxy=config.bilateral_sigma, srgb=config.colour_sigma,
                               rgbim=np.array(image, dtype=np.uint8, order="C", copy=True),
                               compat=config.bilateral_weight)
    return np.asarray(model.inference(config.iterations), dtype=np.float32).reshape(classes, height, width)


def refine_batch(scores: torch.Tensor, images: np.ndarray, config: CrfConfig) -> torch.Tensor:
    """scores [B, K, H, W], images uint8 [B, H, W, 3] -> refined [B, K, H, W] on the scores' device."""
    refined = [refine(s, image, config) for s, image in zip(scores.float().cpu().numpy(), images)]
    return torch.from_numpy(np.stack(refined)).to(scores.device)


def mean_field_reference(scores: np.ndarray, image: np.ndarray, config: CrfConfig) -> np.ndarray:
    """The same CRF, exactly: N x N Gaussian kernels (no lattice approximation), Potts compatibility.
    For tests on images of a few hundred pixels."""
    classes, height, width = scores.shape
    ys, xs = np.mgrid[0:height, 0:width]
    position = np.stack([ys.ravel(), xs.ravel()], 1).astype(np.float64)
    colour = image.reshape(-1, 3).astype(np.float64)

    def kernel(features):
        squared = ((features[:, None, :] - features[None, :, :]) ** 2).sum(-1)
        matrix = np.exp(-0.5 * squared)
        np.fill_diagonal(matrix, 0.0)
        return matrix
    smooth = kernel(position / config.position_sigma)
    appearance = kernel(np.concatenate([position / config.bilateral_sigma, colour / config.colour_sigma], 1))
    energy = unary(scores).astype(np.float64)                       # [K, N]
    marginals = np.exp(-energy - (-energy).max(0))
    marginals /= marginals.sum(0)
    for _ in range(config.iterations):
        message = config.position_weight * marginals @ smooth + config.bilateral_weight * marginals @ appearance
        # Potts: penalty for every other label = total message - message of the same label
        logits = -energy - (message.sum(0, keepdims=True) - message)
        marginals = np.exp(logits - logits.max(0))
        marginals /= marginals.sum(0)
    return marginals.reshape(classes, height, width).astype(np.float32)
