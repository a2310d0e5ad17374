"""Objectives beyond SPML's relations: the tree-energy loss (TEL), the
Gaussian-mixture loss (AGMM), how a run's objective combines its terms, and
the cosine class head; each core computation against a small reference."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from spml_fast.losses import GaussianMixtureConfig, TreeEnergyConfig, gaussian_mixture_loss, mixture_targets, tree_energy_loss
from spml_fast.models import LinearClassifier
from spml_fast.objective import ObjectiveConfig


def test_tree_energy_is_zero_for_region_constant_predictions_and_cuts_at_padding():
    height, width = 6, 6
    colours = torch.zeros(1, 3, height, width)
    colours[:, :, :, 3:] = 1.0                                 # two flat regions, a sharp colour edge
    embeddings = F.normalize(colours.clone() + torch.tensor([1.0, 0, 0]).view(1, 3, 1, 1), dim=1)
    probabilities = torch.zeros(1, 2, height, width)
    probabilities[:, 0, :, :3], probabilities[:, 1, :, 3:] = 1.0, 1.0
    unlabelled = torch.ones(1, height, width, dtype=torch.bool)
    valid = torch.ones_like(unlabelled)
    config = TreeEnergyConfig(colour_sigma=0.05, feature_sigma=0.05)
    assert float(tree_energy_loss(probabilities, colours, embeddings, unlabelled, valid, config)) < 1e-3
    # a prediction that ignores the edge is pulled towards each side's own mean: a positive loss
    flipped = probabilities.clone()
    flipped[:, :, 0, 0] = torch.tensor([0.0, 1.0])
    flipped.requires_grad_()
    loss = tree_energy_loss(flipped, colours, embeddings, unlabelled, valid, config)
    loss.backward()
    assert float(loss.detach()) > 0.01 and flipped.grad[0, :, 0, 0].abs().sum() > 0
    # no unlabelled pixel: zero
    assert float(tree_energy_loss(probabilities, colours, embeddings, ~unlabelled, valid, config)) == 0.0


def brute_force_targets(features, labels, classes, min_std):
    batch, pixels, _ = features.shape
    targets = torch.zeros(batch, pixels, classes, dtype=torch.float64)
    for image in range(batch):
        responses = {}
        for cls in range(classes):
            members = features[image][labels[image] == cls].double()
            if members.shape[0] == 0:
                continue
            mean = members.mean(0)
            std = members.std(0, unbiased=False).clamp(min=min_std)
            responses[cls] = torch.exp(-0.5 * (((features[image].double() - mean) / std) ** 2).mean(1))
        if responses:
            total = sum(responses.values())
            for cls, response in responses.items():
                targets[image, :, cls] = response / total
    return targets


def test_mixture_targets_match_a_per_image_loop():
    gen = torch.Generator().manual_seed(2)
    features = torch.rand(3, 40, 5, generator=gen)
    labels = torch.randint(-1, 4, (3, 40), generator=gen)
    labels[2] = -1                                              # an image without labels: no targets
    targets, has_component = mixture_targets(features, labels, 4, min_std=0.05)
    torch.testing.assert_close(targets.double(), brute_force_targets(features, labels, 4, 0.05), rtol=1e-4,
                               atol=1e-5)
    assert has_component.tolist() == [True, True, False]


def test_gaussian_mixture_loss_uses_unlabelled_pixels_only():
    gen = torch.Generator().manual_seed(3)
    probabilities = torch.rand(2, 3, 4, 4, generator=gen).softmax(1).requires_grad_()
    embeddings = F.normalize(torch.randn(2, 6, 4, 4, generator=gen), dim=1)
    colours = torch.rand(2, 3, 4, 4, generator=gen)
    labels = torch.full((2, 4, 4), -1)
    labels[:, 0, :2], labels[:, 3, 2:] = 0, 2
    valid = torch.ones(2, 4, 4, dtype=torch.bool)
    loss = gaussian_mixture_loss(probabilities, embeddings, colours, labels, valid, GaussianMixtureConfig())
    loss.backward()
    assert float(loss.detach()) > 0
    assert probabilities.grad[:, :, 0, :2].abs().sum() == 0 and probabilities.grad[:, :, 1:3].abs().sum() > 0


def test_objective_validation():
    with pytest.raises(ValueError, match="no term"):
        ObjectiveConfig(relations=0.0)
    with pytest.raises(ValueError, match="partial_ce"):
        ObjectiveConfig(relations=0.0, tree_energy=0.4)
    assert ObjectiveConfig(relations=0.0, partial_ce=1.0).has_head and not ObjectiveConfig().has_head


@pytest.mark.parametrize("preset,terms", [
    ("synthetic-scribble-pce", {"partial_ce"}), ("synthetic-scribble-spml", {"I", "C", "O"}),
    ("synthetic-scribble-hybrid", {"partial_ce", "I", "C", "O"}), ("synthetic-scribble-tel", {"partial_ce", "tree_energy"}),
    ("synthetic-scribble-agmm", {"partial_ce", "gaussian_mixture"}),
    ("synthetic-scribble-hybrid-tel", {"partial_ce", "tree_energy", "I", "C", "O"}),
    ("synthetic-scribble-tel-agmm", {"partial_ce", "tree_energy", "gaussian_mixture"})])
def test_training_step_sums_the_weighted_terms(preset, terms):
    from spml_fast.config import PRESETS, apply_overrides
    from spml_fast.relations import MemoryBank
    from spml_fast.objective import compute
    from spml_fast.train import SpmlModel
    config = apply_overrides(PRESETS[preset], {"model.width": 8, "model.embedding_dim": 8, "kmeans_grid": 2})
    torch.manual_seed(0)
    model = SpmlModel(config, 4)
    label = torch.full((2, 32, 32), 255)
    label[:, 4:8, 4:20], label[:, 20:24, 4:20], label[:, 12:14, 24:30] = 1, 2, 0
    batch = dict(image=torch.randn(2, 3, 32, 32), label=label,
                 overseg=(torch.arange(32)[None, :, None] // 8 * 4 + torch.arange(32)[None, None, :] // 8).expand(
                     2, -1, -1).clone(),
                 valid=torch.ones(2, 32, 32, dtype=torch.bool), tags=torch.tensor([[0b110], [0b100]]),
                 image_ids=torch.arange(2))
    total, values, _ = compute(model, batch, MemoryBank(0), config, 4)
    assert set(values) == terms
    objective = config.objective
    expected = sum(getattr(objective, name) * values[name] for name in ("partial_ce", "tree_energy",
                                                                        "gaussian_mixture") if name in values)
    relation_weights = {"I": config.relations.weight_image, "C": config.relations.weight_semantic,
                        "O": config.relations.weight_cooccurrence}
    expected += objective.relations * sum(relation_weights[n] * values[n] for n in relation_weights if n in values)
    assert float(total.detach()) == pytest.approx(float(expected), rel=1e-5)


def test_cosine_head_folds_into_a_linear_head():
    torch.manual_seed(0)
    head = LinearClassifier(8, 5, scale=10.0)
    embeddings = F.normalize(torch.randn(2, 8, 3, 4), dim=1)
    logits = head(embeddings)
    assert logits.abs().max() <= 10.0 + 1e-5                  # |logit| <= scale on unit embeddings
    torch.testing.assert_close(head.folded()(embeddings), logits, rtol=1e-5, atol=1e-5)
