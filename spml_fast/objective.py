"""What a run learns from: the loss terms of one training step and their
weights. Total loss = sum of weight x term; a term with weight 0 is not
computed.

  relations         SPML's pixel-to-segment relations I/C/O/A (``relations``) on the embedding
  partial_ce        cross-entropy of the class head on the labelled pixels
  tree_energy       TEL (``losses.tree_energy``): the head's prediction against its tree-filtered
                    self on the unlabelled pixels
  gaussian_mixture  AGMM (``losses.gaussian_mixture``): the head's prediction against per-image
                    Gaussian class components on the unlabelled pixels

The presets combine them: ``spml`` (relations alone; the paper), ``pce``
(partial_ce alone; the baseline), ``hybrid`` (partial_ce + relations: one
network, one head), ``tel`` and ``agmm`` (partial_ce + their term),
``hybrid-tel`` and ``tel-agmm`` (partial_ce + two terms). A run
has a class head when any head term has a weight; it then predicts with the
head, otherwise with k-NN against its prototype bank.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from .data import IGNORE, MEAN, STD
from .losses import GaussianMixtureConfig, TreeEnergyConfig, gaussian_mixture_loss, tree_energy_loss

HEAD_TERMS = ("partial_ce", "tree_energy", "gaussian_mixture")


@dataclass(frozen=True)
class ObjectiveConfig:
    relations: float = 1.0            # SPML relations (their own weights in RelationConfig)
    partial_ce: float = 0.0
    tree_energy: float = 0.0
    gaussian_mixture: float = 0.0
    head_scale: float = 10.0          # class head: logits = head_scale x cos(embedding, class weight); 0 = linear
    tree: TreeEnergyConfig = field(default_factory=TreeEnergyConfig)
    mixture: GaussianMixtureConfig = field(default_factory=GaussianMixtureConfig)

    def __post_init__(self):
        for name in ("relations",) + HEAD_TERMS:
            if getattr(self, name) < 0:
                raise ValueError(f"objective.{name} must be >= 0, got {getattr(self, name)}")
        if not (self.relations > 0 or self.has_head):
            raise ValueError("the objective has no term: give objective.relations or a head term a weight > 0")
        if (self.tree_energy or self.gaussian_mixture) and not self.partial_ce:
            raise ValueError("objective.tree_energy / gaussian_mixture spread the labels of partial_ce: "
                             "give objective.partial_ce a weight > 0")

    @property
    def has_head(self) -> bool:
        return any(getattr(self, name) > 0 for name in HEAD_TERMS)


def describe(objective: ObjectiveConfig) -> str:
    """The terms of an objective with their weights, e.g. "partial_ce 1 + tree_energy 0.4"."""
    terms = [(name, getattr(objective, name)) for name in ("relations",) + HEAD_TERMS if getattr(objective, name)]
    return " + ".join(f"{name} {weight:g}" for name, weight in terms)


def image_colours(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Normalised images [B, 3, H, W] -> colours [B, 3, h, w] in [0, 1], area-averaged to ``size``."""
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1)
    return F.adaptive_avg_pool2d((images.float() * std + mean).clamp(0, 1), size)


def head_losses(logits: torch.Tensor, embeddings: torch.Tensor, batch: dict, config: ObjectiveConfig,
                num_classes: int) -> dict:
    """logits [B, K, h, w] of the class head, embeddings [B, D, h, w] -> {term: float32 scalar} for the
    head terms with a weight. batch: image [B, 3, H, W], label [B, H, W] (255 unlabelled), valid [B, H, W]."""
    from .segments import pool_labels, sample_nearest
    losses = {}
    label = torch.where(batch["valid"], batch["label"], torch.full_like(batch["label"], IGNORE))
    if config.partial_ce:
        upsampled = F.interpolate(logits.float(), size=label.shape[-2:], mode="bilinear", align_corners=False)
        losses["partial_ce"] = (F.cross_entropy(upsampled, label, ignore_index=IGNORE) if (label != IGNORE).any()
                                else upsampled.sum() * 0)
    if config.tree_energy or config.gaussian_mixture:
        size = tuple(logits.shape[-2:])
        probabilities = logits.float().softmax(1)
        colours = image_colours(batch["image"], size)
        small_label = pool_labels(label, size, num_classes)
        small_label = torch.where(small_label == IGNORE, -1, small_label)
        valid = sample_nearest(batch["valid"].long(), size) > 0
        if config.tree_energy:
            losses["tree_energy"] = tree_energy_loss(probabilities, colours, embeddings, small_label < 0, valid,
                                                     config.tree)
        if config.gaussian_mixture:
            losses["gaussian_mixture"] = gaussian_mixture_loss(probabilities, embeddings, colours, small_label,
                                                               valid, config.mixture)
    return losses


def weighted_sum(losses: dict, weights: dict) -> torch.Tensor:
    return sum(weights[name] * value for name, value in losses.items())


def head_weights(config: ObjectiveConfig) -> dict:
    return {name: getattr(config, name) for name in HEAD_TERMS}


def total_loss(head_terms: dict, relation_total: Optional[torch.Tensor], config: ObjectiveConfig) -> torch.Tensor:
    """sum of weight x head term, plus objective.relations x the relations' own weighted sum."""
    total = weighted_sum(head_terms, head_weights(config)) if head_terms else 0
    if relation_total is not None:
        total = total + config.relations * relation_total
    return total
