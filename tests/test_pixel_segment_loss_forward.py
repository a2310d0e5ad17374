"""Forward of pixel_segment_loss against the dense reference: every label mode,
reductions, edge cases of the segsort+ rule, dtypes and strides."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import MODES, NEEDS_TRITON, backend_params, device_for, make_problem
from spml_fast import pixel_segment_loss
from spml_fast.ops.reference import pixel_segment_loss_dense


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_dense_reference(backend, mode, reduction):
    problem = make_problem(mode=mode, device=device_for(backend))
    expected = pixel_segment_loss_dense(*problem.args(), kappa=8.0, reduction=reduction, **problem.groups)
    got = pixel_segment_loss(*problem.args(), kappa=8.0, reduction=reduction, backend=backend, **problem.groups)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (33, 1), (64, 64), (97, 130)])
def test_sizes_not_tile_multiples(backend, shape):
    num_pixels, num_segments = shape
    problem = make_problem(num_pixels, num_segments, dim=20, device=device_for(backend), unlabelled=0.0)
    expected = pixel_segment_loss_dense(*problem.args(), kappa=6.0, reduction="none")
    got = pixel_segment_loss(*problem.args(), kappa=6.0, reduction="none", backend=backend)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", backend_params())
def test_single_segment_gives_zero_loss(backend):
    # M = 1: every pixel's own segment is the only one, S- is empty -> L = 0, but pixels still count.
    problem = make_problem(40, 1, unlabelled=0.0, device=device_for(backend))
    problem.segment.zero_()
    loss = pixel_segment_loss(*problem.args(), kappa=10.0, backend=backend, reduction="none")
    assert torch.equal(loss, torch.zeros_like(loss))


@pytest.mark.parametrize("backend", backend_params())
def test_own_segment_rule(backend):
    """Pixel 0 has no other positive (S+ = own); pixel 1 has others (own removed); pixel 2 no negatives."""
    device = device_for(backend)
    embeddings = F.normalize(torch.randn(3, 8), dim=1).to(device)
    prototypes = F.normalize(torch.randn(4, 8), dim=1).to(device)
    segment = torch.tensor([0, 1, 3], device=device)
    pixel_labels = torch.tensor([0, 1, 2], device=device)
    prototype_labels = torch.tensor([0, 1, 1, 2], device=device)   # pixel 2's label lives only in its own segment
    kappa = 5.0
    logits = kappa * embeddings @ prototypes.t()
    expected = torch.stack([
        torch.logsumexp(logits[0, [0, 1, 2, 3]], 0) - logits[0, 0],          # S+ = {0}, S- = {1, 2, 3}
        torch.logsumexp(logits[1, [2, 0, 3]], 0) - logits[1, 2],             # S+ = {2} (own 1 removed), S- = {0, 3}
        torch.logsumexp(logits[2, [3, 0, 1, 2]], 0) - logits[2, 3],          # S+ = {3}, S- = {0, 1, 2}
    ])
    got = pixel_segment_loss(embeddings, prototypes, segment, pixel_labels, prototype_labels, kappa=kappa,
                             reduction="none", backend=backend)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # All labels equal: no negatives anywhere -> zero loss.
    same = torch.zeros(3, dtype=torch.int64, device=device)
    zero = pixel_segment_loss(embeddings, prototypes, segment, same, torch.zeros(4, dtype=torch.int64, device=device),
                              kappa=kappa, reduction="none", backend=backend)
    assert torch.equal(zero, torch.zeros(3, device=device))


@pytest.mark.parametrize("backend", backend_params())
def test_unlabelled_pixels_do_not_count(backend):
    problem = make_problem(unlabelled=0.5, device=device_for(backend))
    per_pixel = pixel_segment_loss(*problem.args(), kappa=10.0, backend=backend, reduction="none")
    unlabelled = problem.pixel_labels < 0
    assert unlabelled.any() and torch.equal(per_pixel[unlabelled], torch.zeros_like(per_pixel[unlabelled]))
    mean = pixel_segment_loss(*problem.args(), kappa=10.0, backend=backend)
    torch.testing.assert_close(mean, per_pixel.sum() / (~unlabelled).sum())
    # no labelled pixel at all: the mean is 0, not NaN
    problem.pixel_labels.fill_(-1)
    assert float(pixel_segment_loss(*problem.args(), kappa=10.0, backend=backend)) == 0.0


@pytest.mark.parametrize("backend", backend_params())
def test_empty_tag_set_pixel(backend):
    # set mode, a pixel with no classes: S+ = {own}, every other segment is a negative.
    problem = make_problem(20, 9, mode="set", device=device_for(backend))
    problem.pixel_labels[0] = 0
    expected = pixel_segment_loss_dense(*problem.args(), kappa=4.0, reduction="none")
    got = pixel_segment_loss(*problem.args(), kappa=4.0, reduction="none", backend=backend)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    logits = 4.0 * problem.embeddings[0] @ problem.prototypes.t()
    own = int(problem.segment[0])
    torch.testing.assert_close(got[0], torch.logsumexp(logits, 0) - logits[own])


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["single", "set+groups"])
def test_low_precision_inputs(backend, dtype, mode):
    """bf16/fp16 inputs accumulate in float32: the loss equals the float32 loss
    of the same (rounded) values to 1e-4, and kappa = 16 does not overflow."""
    problem = make_problem(mode=mode, dtype=dtype, device=device_for(backend))
    got = pixel_segment_loss(*problem.args(), kappa=16.0, backend=backend, reduction="none", **problem.groups)
    expected = pixel_segment_loss_dense(*problem.args(), kappa=16.0, reduction="none", **problem.groups)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", backend_params())
def test_non_contiguous_inputs(backend):
    problem = make_problem(device=device_for(backend))
    embeddings_t = problem.embeddings.t().contiguous().t()           # column-major [N, D]
    prototypes_strided = torch.repeat_interleave(problem.prototypes, 2, dim=0)[::2]   # row stride 2*D
    assert not embeddings_t.is_contiguous() and not prototypes_strided.is_contiguous()
    expected = pixel_segment_loss_dense(*problem.args(), kappa=7.0)
    got = pixel_segment_loss(embeddings_t, prototypes_strided, *problem.args()[2:], kappa=7.0, backend=backend)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", backend_params())
def test_large_kappa_unnormalised_is_finite(backend):
    """Max-shifting: logits of +-800 would overflow exp() in float32 without it."""
    problem = make_problem(device=device_for(backend))
    scaled = problem.embeddings * 10
    got = pixel_segment_loss(scaled, problem.prototypes * 10, *problem.args()[2:], kappa=8.0, backend=backend)
    expected = pixel_segment_loss_dense(scaled, problem.prototypes * 10, *problem.args()[2:], kappa=8.0)
    assert math.isfinite(float(got))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@NEEDS_TRITON
def test_triton_and_torch_paths_agree():
    problem = make_problem(130, 70, mode="set+groups", device=device_for("triton"))
    a = pixel_segment_loss(*problem.args(), backend="triton", reduction="none", **problem.groups, kappa=10.0)
    b = pixel_segment_loss(*problem.args(), backend="torch", reduction="none", **problem.groups, kappa=10.0)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chunk_bytes", [1, 700, 1 << 20])
def test_torch_path_independent_of_chunking(mode, chunk_bytes):
    """Chunks of 1 row, a few rows (chunks spanning several pixel types) and everything at once."""
    from spml_fast import TileConfig
    problem = make_problem(mode=mode, num_classes=3)
    tiles = TileConfig(chunk_bytes=chunk_bytes, min_chunk=1)
    expected = pixel_segment_loss_dense(*problem.args(), kappa=9.0, reduction="none", **problem.groups)
    embeddings, prototypes = problem.leaf()
    got = pixel_segment_loss(embeddings, prototypes, *problem.args()[2:], kappa=9.0, reduction="none",
                             backend="torch", tiles=tiles, **problem.groups)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    got.sum().backward()
    dense_embeddings, dense_prototypes = problem.leaf()
    pixel_segment_loss_dense(dense_embeddings, dense_prototypes, *problem.args()[2:], kappa=9.0, reduction="none",
                             **problem.groups).sum().backward()
    torch.testing.assert_close(embeddings.grad, dense_embeddings.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(prototypes.grad, dense_prototypes.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", backend_params())
def test_one_set_far_below_the_other(backend):
    """Positives at cosine -1, negatives at +1, kappa = 60: exp(-120) underflows float32 under a
    shared shift, so the positive log-sum-exp must be computed with its own maximum."""
    device = device_for(backend)
    direction = F.normalize(torch.randn(1, 16), dim=1)
    embeddings = direction.repeat(6, 1).to(device)
    prototypes = torch.cat([-direction.repeat(3, 1), direction.repeat(3, 1)]).to(device)
    segment = torch.tensor([0, 1, 2, 0, 1, 2], device=device)          # own segments are positives
    pixel_labels = torch.zeros(6, dtype=torch.int64, device=device)
    prototype_labels = torch.tensor([0, 0, 0, 1, 1, 1], device=device)
    got = pixel_segment_loss(embeddings, prototypes, segment, pixel_labels, prototype_labels, kappa=60.0,
                             reduction="none", backend=backend)
    expected = pixel_segment_loss_dense(embeddings, prototypes, segment, pixel_labels, prototype_labels,
                                        kappa=60.0, reduction="none")
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    assert float(got.min()) > 100   # about 2 * kappa: the negatives dominate


@pytest.mark.parametrize("backend", backend_params())
def test_no_segment_takes_part_gives_zero(backend):
    """Every prototype unlabelled, or no prototype in any pixel's group: the loss is 0, not an error."""
    device = device_for(backend)
    problem = make_problem(30, 9, device=device, unlabelled=0.0)
    unlabelled = torch.full_like(problem.prototype_labels, -1)
    loss = pixel_segment_loss(problem.embeddings, problem.prototypes, problem.segment, problem.pixel_labels,
                              unlabelled, backend=backend, kappa=10.0)
    assert float(loss) == 0.0
    pixel_groups = torch.zeros(30, dtype=torch.int64, device=device)
    other_groups = torch.ones(9, dtype=torch.int64, device=device)
    loss = pixel_segment_loss(*problem.args(), pixel_groups=pixel_groups, prototype_groups=other_groups,
                              backend=backend, reduction="none", kappa=10.0)
    expected = pixel_segment_loss_dense(*problem.args(), pixel_groups=pixel_groups, prototype_groups=other_groups,
                                        reduction="none", kappa=10.0)
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("backend", backend_params())
def test_nan_in_an_unlabelled_pixel_is_ignored(backend):
    device = device_for(backend)
    problem = make_problem(40, 12, device=device, unlabelled=0.0)
    problem.pixel_labels[5] = -1
    embeddings = problem.embeddings.clone()
    embeddings[5] = float("nan")
    embeddings.requires_grad_()
    loss = pixel_segment_loss(embeddings, problem.prototypes, *problem.args()[2:], backend=backend,
                                  kappa=10.0)
    expected = pixel_segment_loss(problem.embeddings, problem.prototypes, *problem.args()[2:], backend=backend,
                                  kappa=10.0)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert torch.isfinite(embeddings.grad[torch.arange(40, device=device) != 5]).all()
