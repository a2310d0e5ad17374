"""segment_prototypes against the one-hot dense reference, forward and backward."""
import pytest
import torch
import torch.nn.functional as F

from conftest import backend_params, device_for
from spml_fast import segment_prototypes
from spml_fast.ops.reference import segment_prototypes_dense


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-5), (torch.float16, 1e-5)])
def test_forward_matches_dense(backend, dtype, tolerance):
    device = device_for(backend)
    embeddings = F.normalize(torch.randn(157, 20), dim=1).to(device=device, dtype=dtype)
    segment = torch.randint(0, 37, (157,), device=device)
    segment[segment == 5] = 6                                    # segment 5 empty
    prototypes, counts = segment_prototypes(embeddings, segment, 37, backend=backend, return_counts=True)
    assert prototypes.dtype == torch.float32 and prototypes.shape == (37, 20)
    torch.testing.assert_close(prototypes, segment_prototypes_dense(embeddings, segment, 37),
                               rtol=tolerance, atol=tolerance)
    assert torch.equal(counts, torch.bincount(segment, minlength=37).float())
    assert torch.equal(prototypes[5], torch.zeros(20, device=device))
    norms = prototypes.norm(dim=1)[counts > 0]
    torch.testing.assert_close(norms, torch.ones_like(norms))


@pytest.mark.parametrize("backend", backend_params())
def test_backward_matches_dense(backend):
    device = device_for(backend)
    embeddings = torch.randn(90, 12, device=device)
    segment = torch.randint(0, 17, (90,), device=device)
    weights = torch.randn(17, 12, device=device)
    grads = []
    for fn in (lambda e: segment_prototypes(e, segment, 17, backend=backend),
               lambda e: segment_prototypes_dense(e, segment, 17)):
        leaf = embeddings.clone().requires_grad_()
        (fn(leaf) * weights).sum().backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_gradcheck_float64():
    embeddings = torch.randn(15, 4, dtype=torch.float64, requires_grad=True)
    segment = torch.tensor([0, 1, 2, 3] * 3 + [0, 1, 2])
    assert torch.autograd.gradcheck(lambda e: segment_prototypes(e, segment, 4, backend="torch"), (embeddings,))


def test_bad_input():
    embeddings = torch.randn(10, 4)
    with pytest.raises(ValueError, match="segment"):
        segment_prototypes(embeddings, torch.full((10,), 3), 3)
    with pytest.raises(ValueError, match="segment"):
        segment_prototypes(embeddings, torch.zeros(9, dtype=torch.int64), 3)
    with pytest.raises(ValueError, match="num_segments"):
        segment_prototypes(embeddings, torch.zeros(10, dtype=torch.int64), 0)
    with pytest.raises(ValueError, match="embeddings"):
        segment_prototypes(torch.randn(0, 4), torch.zeros(0, dtype=torch.int64), 3)
