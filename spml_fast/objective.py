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

import functools
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from .data import IGNORE, image_colours
from .losses import ColourTree, GaussianMixtureConfig, TreeEnergyConfig, gaussian_mixture_loss, tree_energy_loss

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
        weights = {name: getattr(self, name) for name in HEAD_TERMS}
        if (weights["tree_energy"] or weights["gaussian_mixture"]) and not weights["partial_ce"]:
            raise ValueError("the objective's tree_energy / gaussian_mixture terms spread the labels of partial_ce: "
                             "give its partial_ce a weight > 0")

    @property
    def has_head(self) -> bool:
        return any(getattr(self, name) > 0 for name in HEAD_TERMS)


def describe(objective: ObjectiveConfig) -> str:
    """The terms of an objective with their weights, e.g. "partial_ce 1 + tree_energy 0.4"."""
    terms = [(name, getattr(objective, name)) for name in ("relations",) + HEAD_TERMS if getattr(objective, name)]
    return " + ".join(f"{name} {weight:g}" for name, weight in terms)


SMALL_KEYS = ("small_colours", "small_label", "small_valid")


def small_maps(image: torch.Tensor, label: torch.Tensor, valid: torch.Tensor, num_classes: int,
               colour_sigma: Optional[float] = None) -> dict:
    """What the tree-energy and Gaussian-mixture terms read at the embedding's size (h, w)
    (``models.output_size``), from the batch alone: image [B, 3, H, W] normalised, label [B, H, W]
    (255 unlabelled), valid [B, H, W] bool -> {small_colours [B, 3, h, w] in [0, 1], small_label
    [B, h, w] int64 (-1 unlabelled), small_valid [B, h, w] bool}, plus the colour tree
    (``ColourTree.KEYS``) with ``colour_sigma``. The data pipeline computes them per sample in its
    workers (``SegmentationDataset(prepare=...)``); the step computes them only for a batch without."""
    from .losses.tree_energy import colour_tree
    from .models import output_size
    from .segments import pool_labels, sample_nearest
    size = output_size(*image.shape[-2:])
    label = torch.where(valid, label, torch.full_like(label, IGNORE))
    small_label = pool_labels(label, size, num_classes)
    maps = dict(small_colours=image_colours(image, size), small_label=torch.where(small_label == IGNORE, -1, small_label),
                small_valid=sample_nearest(valid.long(), size) > 0)
    if colour_sigma is not None:
        maps.update(colour_tree(maps["small_colours"], maps["small_valid"], colour_sigma).items())
    return maps


def prepare_sample(sample: dict, num_classes: int, colour_sigma: Optional[float]) -> dict:
    """The data pipeline's hook (picklable with ``functools.partial``): a sample with its ``small_maps``."""
    batch = {key: sample[key][None] for key in ("image", "label", "valid")}
    maps = small_maps(batch["image"], batch["label"], batch["valid"], num_classes, colour_sigma)
    return dict(sample, **{key: value[0] for key, value in maps.items()})


def sample_preparer(config, num_classes: int):
    """The ``prepare`` hook of a run's training data: the small maps (and the colour tree with the
    tree-energy term) when the objective has a term that reads them, else None."""
    weights = term_weights(config)
    if not (weights["tree_energy"] or weights["gaussian_mixture"]):
        return None
    sigma = config.objective.tree.colour_sigma if weights["tree_energy"] else None
    return functools.partial(prepare_sample, num_classes=num_classes, colour_sigma=sigma)


def head_losses(logits: torch.Tensor, embeddings: torch.Tensor, batch: dict, config: ObjectiveConfig,
                num_classes: int, terms: set) -> dict:
    """logits [B, K, h, w] of the class head, embeddings [B, D, h, w] -> {term: float32 scalar} for the head
    ``terms`` asked for (those with a weight). batch: image [B, 3, H, W], label [B, H, W] (255 unlabelled),
    valid [B, H, W], and the ``small_maps`` if the data pipeline made them. No term asks the host
    anything (no sync): empty selections give 0 through clamped counts."""
    losses = {}
    if "partial_ce" in terms:
        label = torch.where(batch["valid"], batch["label"], torch.full_like(batch["label"], IGNORE))
        upsampled = F.interpolate(logits.float(), size=label.shape[-2:], mode="bilinear", align_corners=False)
        summed = F.cross_entropy(upsampled, label, ignore_index=IGNORE, reduction="sum")
        losses["partial_ce"] = summed / (label != IGNORE).sum().clamp(min=1)
    if terms & {"tree_energy", "gaussian_mixture"}:
        maps = batch if all(key in batch for key in SMALL_KEYS) else small_maps(
            batch["image"], batch["label"], batch["valid"], num_classes)
        if tuple(maps["small_label"].shape[-2:]) != tuple(logits.shape[-2:]):
            raise ValueError(f"the batch's small maps are {tuple(maps['small_label'].shape[-2:])}, the prediction "
                             f"{tuple(logits.shape[-2:])}: the network's output stride is not models.OUTPUT_STRIDE")
        probabilities = logits.float().softmax(1)
        colours, small_label, valid = (maps[key] for key in SMALL_KEYS)
        if "tree_energy" in terms:
            losses["tree_energy"] = tree_energy_loss(probabilities, colours, embeddings, small_label < 0, valid,
                                                     config.tree, ColourTree.from_batch(batch))
        if "gaussian_mixture" in terms:
            losses["gaussian_mixture"] = gaussian_mixture_loss(probabilities, embeddings, colours, small_label,
                                                               valid, config.mixture)
    return losses


def term_weights(config) -> dict:
    """The weight of every loss term of a ``TrainConfig``: the head terms' own, and the relations' weights
    times ``objective.relations``. The one place a term's weight is read."""
    objective = config.objective
    weights = {name: getattr(objective, name) for name in HEAD_TERMS}
    weights.update({name: objective.relations * weight for name, weight in config.relations.weights().items()})
    return weights


def compute(model, batch: dict, bank, config, num_classes: int):
    """One step's loss: (total float32 scalar, {term: detached float32 scalar}, this batch's segments for
    the memory bank or None).

    model: the ``SpmlModel`` (or its DDP wrapper); batch: image [B, 3, H, W] normalised, label [B, H, W]
    int64 (255 unlabelled), overseg [B, H, W] int64, valid [B, H, W] bool, tags [B, W] int64, image_ids
    [B] int64 (unique across iterations and ranks); bank: the relations' ``MemoryBank``; config: the
    ``TrainConfig``. Terms with weight 0 are not computed; total = sum of weight x term (``term_weights``).
    """
    from .relations import relation_losses
    from .segments import make_segments
    embeddings = model(batch["image"])
    objective = config.objective
    weights = term_weights(config)
    terms, local = {}, None
    if objective.has_head:
        classifier = model.module.classifier if hasattr(model, "module") else model.classifier
        wanted = {name for name in HEAD_TERMS if weights[name]}
        terms.update(head_losses(classifier(embeddings), embeddings, batch, objective, num_classes, wanted))
    if objective.relations:
        segments = make_segments(embeddings, batch["label"], batch["overseg"], batch["valid"], batch["tags"],
                                 num_classes, config.kmeans_grid, config.kmeans_iterations)
        relations, local = relation_losses(segments, bank, config.relations, num_classes, batch["image_ids"])
        terms.update(relations)
    total = functools.reduce(torch.add, [weights[name] * value for name, value in terms.items()])
    return total, {name: value.detach() for name, value in terms.items()}, local
