"""nearest_prototype against the dense [N, M] top-k."""
import pytest
import torch
import torch.nn.functional as F

from conftest import backend_params, device_for
from spml_fast import nearest_prototype
from spml_fast.ops.reference import nearest_prototype_dense


def unit(rows, dim, device, dtype=torch.float32):
    return F.normalize(torch.randn(rows, dim), dim=1).to(device=device, dtype=dtype)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("k", [1, 3, 20])
@pytest.mark.parametrize("groups", [False, True])
def test_matches_dense_topk(backend, k, groups):
    device = device_for(backend)
    embeddings, prototypes = unit(171, 24, device), unit(83, 24, device)
    group_args = {}
    if groups:
        group_args = dict(pixel_groups=torch.randint(0, 2, (171,), device=device),
                          prototype_groups=torch.randint(0, 2, (83,), device=device))
    indices, values = nearest_prototype(embeddings, prototypes, k, backend=backend, **group_args)
    expected_indices, expected_values = nearest_prototype_dense(embeddings, prototypes, k, **group_args)
    assert indices.shape == (171, k) and indices.dtype == torch.int64 and values.dtype == torch.float32
    torch.testing.assert_close(values, expected_values, rtol=1e-6, atol=1e-6)
    assert torch.equal(indices, expected_indices)
    assert (values[:, :-1] >= values[:, 1:]).all()


@pytest.mark.parametrize("backend", backend_params())
def test_fewer_eligible_than_k(backend):
    device = device_for(backend)
    embeddings, prototypes = unit(40, 16, device), unit(10, 16, device)
    pixel_groups = torch.zeros(40, dtype=torch.int64, device=device)
    prototype_groups = torch.tensor([0, 0, 1, 1, 1, 1, 1, 1, 1, 1], device=device)  # only 2 eligible
    indices, values = nearest_prototype(embeddings, prototypes, 4, pixel_groups, prototype_groups, backend=backend)
    assert set(indices[:, :2].unique().tolist()) <= {0, 1}
    assert (indices[:, 2:] == -1).all() and torch.isinf(values[:, 2:]).all()


@pytest.mark.parametrize("backend", backend_params())
def test_ties_go_to_lower_index(backend):
    device = device_for(backend)
    prototypes = unit(1, 16, device).repeat(70, 1)           # 70 identical prototypes
    embeddings = unit(5, 16, device)
    nearest, _ = nearest_prototype(embeddings, prototypes, 1, backend=backend)
    assert torch.equal(nearest, torch.zeros(5, 1, dtype=torch.int64, device=device))
    indices, values = nearest_prototype(embeddings, prototypes, 3, backend=backend)
    assert (indices[:, :-1] < indices[:, 1:]).all()                       # tied values in index order
    torch.testing.assert_close(values, values[:, :1].expand(-1, 3))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(backend, dtype):
    device = device_for(backend)
    embeddings, prototypes = unit(64, 32, device, dtype), unit(50, 32, device, dtype)
    indices, values = nearest_prototype(embeddings, prototypes, 5, backend=backend)
    _, expected_values = nearest_prototype_dense(embeddings, prototypes, 5)
    torch.testing.assert_close(values, expected_values, rtol=1e-5, atol=1e-5)
    chosen = (embeddings.float()[:, None, :] * prototypes.float()[indices]).sum(-1)
    torch.testing.assert_close(chosen, values, rtol=1e-5, atol=1e-5)


def test_bad_input():
    embeddings, prototypes = torch.randn(10, 4), torch.randn(6, 4)
    with pytest.raises(ValueError, match="k must"):
        nearest_prototype(embeddings, prototypes, 7)
    with pytest.raises(ValueError, match="k must"):
        nearest_prototype(embeddings, prototypes, 0)
    with pytest.raises(ValueError, match="prototypes"):
        nearest_prototype(embeddings, torch.randn(6, 5))
    with pytest.raises(ValueError, match="prototypes"):
        nearest_prototype(embeddings, prototypes.half())
    with pytest.raises(ValueError, match="prototype_groups"):
        nearest_prototype(embeddings, prototypes, 1, pixel_groups=torch.zeros(10, dtype=torch.int64))
