"""Predictors: pixel k-NN votes, argmax at k = 1, segment-level k-NN, the classifier
head (and train-classifier), sliding windows with padding, multi-scale."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from spml_fast.bank import PrototypeBank
from spml_fast.classifier import ClassifierConfig, fit_classifier, load_classifier, save_classifier
from spml_fast.inference import PredictorConfig, embedding_scores, predict_scores, vote_scores
from spml_fast.models import EmbeddingNet, ModelConfig

NAMES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return EmbeddingNet(ModelConfig(backbone="small", embedding_dim=8, width=8)).eval()


def test_votes_count_labels_and_skip_missing():
    votes = vote_scores(torch.tensor([[0, 0, 2], [1, -1, -1]]), 3)
    torch.testing.assert_close(votes, torch.tensor([[2 / 3, 0, 1 / 3], [0, 1 / 3, 0]]))


def test_pixel_knn_k1_is_the_nearest_prototypes_label():
    prototypes = F.normalize(torch.randn(12, 8), dim=1)
    labels = torch.arange(12) % 3
    bank = PrototypeBank(prototypes, labels, NAMES)
    embedding = F.normalize(torch.randn(2, 8, 5, 6), dim=1)
    scores = embedding_scores(embedding, bank, PredictorConfig(k=1))
    flat = embedding.permute(0, 2, 3, 1).reshape(-1, 8)
    expected = labels[(flat @ prototypes.t()).argmax(1)].reshape(2, 5, 6)
    assert torch.equal(scores.argmax(1), expected)
    assert set(scores.unique().tolist()) <= {0.0, 1.0}


def test_segment_knn_gives_one_vote_per_segment():
    prototypes = F.normalize(torch.randn(30, 8), dim=1)
    bank = PrototypeBank(prototypes, torch.arange(30) % 3, NAMES)
    # two flat regions: every pixel of a region has the same embedding -> one segment each
    embedding = torch.zeros(1, 8, 8, 8)
    embedding[:, 0, :, :4] = 1.0
    embedding[:, 1, :, 4:] = 1.0
    scores = embedding_scores(embedding, bank, PredictorConfig(method="segment-knn", k=5, segment_grid=2))
    left, right = scores[0, :, :, :4].flatten(1), scores[0, :, :, 4:].flatten(1)
    assert (left == left[:, :1]).all() and (right == right[:, :1]).all()
    torch.testing.assert_close(scores.sum(1), torch.ones(1, 8, 8))


def test_sliding_window_pads_short_sides_and_covers_every_pixel(net):
    bank = PrototypeBank(F.normalize(torch.randn(20, 8), dim=1), torch.arange(20) % 3, NAMES)
    image = torch.randn(1, 3, 24, 70)                     # height below the window: padded up to it
    scores = predict_scores(net, image, bank, PredictorConfig(k=3, window=32))
    assert scores.shape == (1, 3, 24, 70)
    assert (scores.sum(1) >= 1 - 1e-5).all()              # overlapping windows sum, none missed
    whole = predict_scores(net, image, bank, PredictorConfig(k=3, window=80))
    torch.testing.assert_close(whole, predict_scores(net, image, bank, PredictorConfig(k=3)))


def test_multi_scale_averages_scales(net):
    bank = PrototypeBank(F.normalize(torch.randn(20, 8), dim=1), torch.arange(20) % 3, NAMES)
    image = torch.randn(1, 3, 40, 48)
    one = predict_scores(net, image, bank, PredictorConfig(k=3, scales=(1.0,)))
    half = predict_scores(net, image, bank, PredictorConfig(k=3, scales=(0.5,)))
    both = predict_scores(net, image, bank, PredictorConfig(k=3, scales=(1.0, 0.5)))
    torch.testing.assert_close(both, (one + half) / 2)


def test_bad_predictor_settings_are_named():
    with pytest.raises(ValueError, match="method"):
        PredictorConfig(method="crf")
    with pytest.raises(ValueError, match="window"):
        PredictorConfig(window=2)
    with pytest.raises(ValueError, match="needs a prototype bank"):
        embedding_scores(torch.zeros(1, 8, 2, 2), nn.Conv2d(8, 3, 1), PredictorConfig())
    bank = PrototypeBank(torch.zeros(3, 4), torch.zeros(3, dtype=torch.int64), NAMES)
    with pytest.raises(ValueError, match="bank D = 4"):
        embedding_scores(torch.zeros(1, 8, 2, 2), bank, PredictorConfig(k=1))


def test_classifier_head_fits_separable_embeddings_and_round_trips(tmp_path):
    generator = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(3, 8, generator=generator), dim=1)
    labels = torch.randint(0, 3, (600,), generator=generator)
    features = F.normalize(centres[labels] + 0.1 * torch.randn(600, 8, generator=generator), dim=1)
    head = fit_classifier(features, labels, 3, ClassifierConfig(epochs=150), progress=False)
    accuracy = (head(features[:, :, None, None])[:, :, 0, 0].argmax(1) == labels).float().mean()
    assert accuracy > 0.95
    path = str(tmp_path / "head.safetensors")
    save_classifier(head, NAMES, path)
    loaded, names, _ = load_classifier(path)
    assert names == NAMES
    embedding = features[:4].t().reshape(1, 8, 2, 2)
    scores = embedding_scores(embedding, loaded, PredictorConfig(method="classifier"))
    torch.testing.assert_close(scores.sum(1), torch.ones(1, 2, 2))
    torch.testing.assert_close(scores, embedding_scores(embedding, head, PredictorConfig(method="classifier")))
