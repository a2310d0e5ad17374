"""Dense CRF post-processing (spml_fast/crf.py, pydensecrf2) against the exact
mean-field reference, and its effect on a noisy prediction."""
import numpy as np
import pytest
import torch

pytest.importorskip("pydensecrf.densecrf", reason="pydensecrf2 not installed")

from spml_fast.crf import CrfConfig, mean_field_reference, refine  # noqa: E402


def two_region_scene(size=16, noise=0.35, seed=0):
    """A two-colour image (left dark, right bright) and class scores that are right on average but noisy."""
    rng = np.random.default_rng(seed)
    image = np.zeros((size, size, 3), dtype=np.uint8)
    image[:, size // 2:] = 200
    image = np.clip(image.astype(int) + rng.integers(-10, 10, image.shape), 0, 255).astype(np.uint8)
    truth = np.zeros((size, size), dtype=np.int64)
    truth[:, size // 2:] = 1
    scores = np.where(truth[None] == np.arange(2)[:, None, None], 0.6, 0.4) + rng.uniform(-noise, noise, (2, size, size))
    scores = np.clip(scores, 0.01, None)
    return image, truth, (scores / scores.sum(0, keepdims=True)).astype(np.float32)


def test_package_matches_the_exact_mean_field():
    image, _, scores = two_region_scene(size=12)
    config = CrfConfig(enabled=True, iterations=5, position_sigma=2.0, bilateral_sigma=6.0, colour_sigma=20.0)
    package = refine(scores, image, config)
    exact = mean_field_reference(scores, image, config)
    assert package.shape == exact.shape == scores.shape
    # the permutohedral lattice approximates the Gaussian filter: labels agree almost everywhere
    assert (package.argmax(0) == exact.argmax(0)).mean() >= 0.95
    np.testing.assert_allclose(package.sum(0), 1.0, atol=1e-4)


def test_crf_cleans_a_noisy_prediction_along_colour_edges():
    image, truth, scores = two_region_scene(size=24, noise=0.45, seed=1)
    before = (scores.argmax(0) == truth).mean()
    after = (refine(scores, image, CrfConfig(enabled=True)).argmax(0) == truth).mean()
    assert before < 0.9 and after > 0.98 and after > before


def test_predictor_applies_the_crf():
    from spml_fast.inference import PredictorConfig, predict_scores
    from spml_fast.models import LinearClassifier
    torch.manual_seed(0)

    class Constant(torch.nn.Module):                              # an "embedding network" of fixed output
        def forward(self, images):
            return torch.nn.functional.normalize(torch.randn(images.shape[0], 4, images.shape[2] // 4,
                                                             images.shape[3] // 4), dim=1)
    images = torch.randn(1, 3, 32, 32)
    head = LinearClassifier(4, 3, scale=5.0)
    torch.manual_seed(1)
    plain = predict_scores(Constant(), images, head, PredictorConfig(method="classifier"))
    torch.manual_seed(1)
    refined = predict_scores(Constant(), images, head, PredictorConfig(method="classifier", crf=CrfConfig(enabled=True)))
    assert refined.shape == plain.shape
    torch.testing.assert_close(refined.sum(1), torch.ones(1, 32, 32), atol=1e-4, rtol=0)
    assert not torch.allclose(refined, plain)
