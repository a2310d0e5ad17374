"""Backward of pixel_segment_loss: gradients against autograd through the dense
reference, gradcheck in float64, low precision, arbitrary upstream gradients."""
import pytest
import torch

from conftest import MODES, backend_params, device_for, make_problem
from spml_fast import pixel_segment_loss
from spml_fast.ops.reference import pixel_segment_loss_dense


def gradients(loss_fn, problem, dtype=None, upstream=None, **kwargs):
    embeddings, prototypes = problem.leaf(dtype)
    loss = loss_fn(embeddings, prototypes, *problem.args()[2:], **kwargs)
    if upstream is not None:
        loss = (loss * upstream).sum()
    return torch.autograd.grad(loss, (embeddings, prototypes))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("mode", MODES)
def test_gradients_match_dense(backend, mode):
    problem = make_problem(mode=mode, device=device_for(backend))
    expected = gradients(pixel_segment_loss_dense, problem, kappa=10.0, **problem.groups)
    got = gradients(pixel_segment_loss, problem, kappa=10.0, backend=backend, **problem.groups)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", backend_params())
def test_gradients_with_arbitrary_upstream(backend):
    """reduction='none' with a random per-pixel upstream gradient (including 0 and negatives)."""
    problem = make_problem(mode="single+groups", device=device_for(backend))
    upstream = torch.randn(problem.embeddings.shape[0], device=problem.embeddings.device)
    upstream[::5] = 0
    expected = gradients(pixel_segment_loss_dense, problem, upstream=upstream, kappa=12.0, reduction="none",
                         **problem.groups)
    got = gradients(pixel_segment_loss, problem, upstream=upstream, kappa=12.0, reduction="none",
                    backend=backend, **problem.groups)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", backend_params())
def test_zero_upstream_gives_zero_gradients(backend):
    problem = make_problem(device=device_for(backend))
    problem.pixel_labels.fill_(-1)        # nobody participates
    grads = gradients(pixel_segment_loss, problem, backend=backend, kappa=10.0)
    assert all(torch.count_nonzero(g) == 0 for g in grads)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_gradients(backend, dtype):
    """Gradients come back in the input dtype; against float32 gradients of the
    same rounded values they agree to the dtype's resolution (2e-2 relative to
    the largest entry for bf16, 5e-3 for fp16)."""
    problem = make_problem(mode="set", dtype=dtype, device=device_for(backend))
    expected = gradients(pixel_segment_loss_dense, problem, dtype=torch.float32, kappa=16.0)
    got = gradients(pixel_segment_loss, problem, kappa=16.0, backend=backend)
    tolerance = 2e-2 if dtype == torch.bfloat16 else 5e-3
    for g, e in zip(got, expected):
        assert g.dtype == dtype and torch.isfinite(g).all()
        assert (g.float() - e).abs().max() <= tolerance * e.abs().max()


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_float64_cpu_path(mode):
    problem = make_problem(14, 6, dim=5, mode=mode, num_groups=2, dtype=torch.float64)
    embeddings, prototypes = problem.leaf()

    def loss(e, p):
        return pixel_segment_loss(e, p, *problem.args()[2:], kappa=3.0, backend="torch", reduction="none",
                                  **problem.groups)

    assert torch.autograd.gradcheck(loss, (embeddings, prototypes), eps=1e-6, atol=1e-6)


def test_gradcheck_float64_through_normalisation():
    """The loss composed with L2 normalisation, as in training (embeddings need not be unit length)."""
    problem = make_problem(12, 5, dim=4, dtype=torch.float64)
    embeddings, prototypes = problem.leaf()

    def loss(e, p):
        e, p = torch.nn.functional.normalize(e, dim=1), torch.nn.functional.normalize(p, dim=1)
        return pixel_segment_loss(e, p, *problem.args()[2:], kappa=6.0, backend="torch")

    assert torch.autograd.gradcheck(loss, (embeddings * 3, prototypes * 2), eps=1e-6, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU: 64-bit addressing needs N*M > 2^31 on a device")
def test_large_problem_64bit_addressing():
    """N * M = 2^32 > 2^31: offsets must be 64-bit; checked against a subset computed densely."""
    num_pixels, num_segments = 1 << 20, 1 << 12
    problem = make_problem(num_pixels, num_segments, dim=32, dtype=torch.bfloat16, device="cuda", unlabelled=0.0)
    per_pixel = pixel_segment_loss(*problem.args(), kappa=10.0, reduction="none", backend="triton")
    rows = torch.cat([torch.arange(0, 256), torch.arange(num_pixels - 256, num_pixels)]).cuda()
    expected = pixel_segment_loss_dense(problem.embeddings[rows], problem.prototypes, problem.segment[rows],
                                        problem.pixel_labels[rows], problem.prototype_labels,
                                        kappa=10.0, reduction="none")
    torch.testing.assert_close(per_pixel[rows], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("kappa,scale", [(200.0, 1.0), (60.0, 3.0)])
def test_gradients_finite_and_exact_when_positives_are_far_below(backend, kappa, scale):
    """kappa = 200 (or non-unit embeddings): the positive set lies far below the total, where
    1 - exp(lse_all - lse_positive) overflows; gradients stay finite and match float64."""
    device = device_for(backend)
    problem = make_problem(60, 20, dim=8, device=device, unlabelled=0.0)
    embeddings = (problem.embeddings * scale).requires_grad_()
    prototypes = problem.prototypes.clone().requires_grad_()
    loss = pixel_segment_loss(embeddings, prototypes, *problem.args()[2:], kappa=kappa, backend=backend)
    loss.backward()
    e64, p64 = embeddings.detach().double().requires_grad_(), prototypes.detach().double().requires_grad_()
    pixel_segment_loss_dense(e64, p64, *problem.args()[2:], kappa=kappa).backward()
    assert torch.isfinite(embeddings.grad).all() and torch.isfinite(prototypes.grad).all()
    torch.testing.assert_close(embeddings.grad.double(), e64.grad.double(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(prototypes.grad.double(), p64.grad.double(), rtol=1e-4, atol=1e-4)
