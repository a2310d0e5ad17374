"""Batched per-image spherical k-means against a per-image Python loop."""
import pytest
import torch
import torch.nn.functional as F

from conftest import backend_params, device_for
from spml_fast import grid_assignment, spherical_kmeans


def kmeans_one_image(features, assignment, iterations):
    """Plain spherical k-means on one image, empty clusters vanish."""
    num_clusters = int(assignment.max()) + 1
    for _ in range(iterations):
        sums = torch.zeros(num_clusters, features.shape[1]).index_add_(0, assignment, features.float())
        counts = torch.bincount(assignment, minlength=num_clusters)
        similarity = features.float() @ F.normalize(sums, dim=1).t()
        similarity[:, counts == 0] = float("-inf")
        assignment = similarity.argmax(1)
    return assignment


def test_grid_assignment():
    assignment, groups = grid_assignment(2, 4, 6, 2, 3)
    first = assignment[:24].view(4, 6)
    assert torch.equal(first, torch.tensor([[0, 0, 1, 1, 2, 2]] * 2 + [[3, 3, 4, 4, 5, 5]] * 2))
    assert torch.equal(assignment[24:], assignment[:24] + 6)
    assert torch.equal(groups, torch.tensor([0] * 24 + [1] * 24))
    with pytest.raises(ValueError, match="grid_rows"):
        grid_assignment(1, 4, 4, 0, 2)


@pytest.mark.parametrize("backend", backend_params())
def test_batched_equals_per_image_loop(backend):
    device = device_for(backend)
    batch, height, width, dim = 3, 10, 9, 16
    init, groups = grid_assignment(batch, height, width, 3, 3, device=device)
    # features with a few real clusters per image, so k-means moves pixels around
    centres = F.normalize(torch.randn(batch, 4, dim), dim=2)
    which = torch.randint(0, 4, (batch, height * width))
    features = F.normalize(centres[torch.arange(batch)[:, None], which] + 0.3 * torch.randn(batch, height * width, dim),
                           dim=2).reshape(-1, dim).to(device)
    assignment, prototypes = spherical_kmeans(features, init, 10, groups, backend=backend)
    pixels = height * width
    for image in range(batch):
        rows = slice(image * pixels, (image + 1) * pixels)
        expected = kmeans_one_image(features[rows].cpu(), init[rows].cpu() - image * 9, 10) + image * 9
        assert torch.equal(assignment[rows].cpu(), expected)
    assert not torch.equal(assignment, init)
    # clusters never cross images, prototypes are the normalised means of the final clusters
    assert torch.equal(assignment // 9, groups)
    live = torch.bincount(assignment, minlength=prototypes.shape[0]) > 0
    torch.testing.assert_close(prototypes[live].norm(dim=1), torch.ones(int(live.sum()), device=device))


def test_bad_input():
    features = F.normalize(torch.randn(8, 4), dim=1)
    with pytest.raises(ValueError, match="different groups"):
        spherical_kmeans(features, torch.zeros(8, dtype=torch.int64), 2, torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]))
    with pytest.raises(ValueError, match="iterations"):
        spherical_kmeans(features, torch.zeros(8, dtype=torch.int64), -1)
    with pytest.raises(ValueError, match="init_assignment"):
        spherical_kmeans(features, torch.full((8,), -1), 2)
