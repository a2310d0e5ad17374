"""The loss kernels at the tile shapes a GPU runs: the pinned sm90 configurations (64 x 128 tiles for
D <= 64, 64 x 64 for D <= 128, 16 x 64 for D <= 256) through the interpreter, against the float64 dense reference, at sizes
that leave ragged tiles; and the same bits run to run in fresh processes on the CPU, both backends."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import NEEDS_TRITON, TRITON_ON_CPU, make_problem
from spml_fast import pixel_segment_loss
from spml_fast.ops.reference import pixel_segment_loss_dense


def loss_and_grads(loss_fn, problem, **kwargs):
    embeddings, prototypes = problem.leaf()
    if loss_fn is pixel_segment_loss_dense:                     # the float64 oracle on the same values
        embeddings, prototypes = (t.detach().double().requires_grad_() for t in (embeddings, prototypes))
    loss = loss_fn(embeddings, prototypes, *problem.args()[2:], kappa=10.0, **problem.groups, **kwargs)
    return (loss, *torch.autograd.grad(loss, (embeddings, prototypes)))


@NEEDS_TRITON
@pytest.mark.skipif(not TRITON_ON_CPU, reason="on a GPU the compiled kernels run these shapes (test_gpu_kernels)")
@pytest.mark.parametrize("mode,dim", [("single", 32), ("set", 32), ("single", 96), ("single+groups", 160)])
def test_sm90_tiles_through_the_interpreter(monkeypatch, mode, dim):
    import spml_fast.triton_kernels.configs as configs
    from spml_fast.triton_kernels.utils import block_dim
    monkeypatch.setattr(configs, "architecture", lambda device: "sm90")
    config = configs.contrast_config(torch.device("cpu"), block_dim(dim))
    # four (pixels) and two (segments) tiles and a bit: uniform, column- and pair-masked and ragged tiles at
    # the shipped BLOCK sizes
    problem = make_problem(4 * config.block_n + 11, 2 * config.block_m + 5, dim=dim, mode=mode, num_classes=3)
    if config.column_masked and not problem.groups:
        from spml_fast.ops.contrast_plan import build_plan
        described = build_plan(problem.segment, problem.pixel_labels, problem.prototype_labels, None, None,
                               config.block_n, config.block_m).describe()
        assert described["column_masked_tiles"] > 0 and described["pair_masked_tiles"] > 0, described
    got = loss_and_grads(pixel_segment_loss, problem, backend="triton")
    expected = loss_and_grads(pixel_segment_loss_dense, problem)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.double(), e.double(), rtol=1e-4, atol=1e-6)


RUN_TWICE = r"""
import hashlib, sys, torch
sys.path.insert(0, sys.argv[1])
from conftest import make_problem
from spml_fast import pixel_segment_loss
problem = make_problem(300, 90, dim=24, mode="single+groups")
e, p = problem.leaf()
loss = pixel_segment_loss(e, p, *problem.args()[2:], kappa=10.0, backend=sys.argv[2], **problem.groups)
loss.backward()
print(hashlib.sha256(b"".join(t.numpy().tobytes() for t in (loss.detach(), e.grad, p.grad))).hexdigest())
"""


ON_THE_CPU_ONLY = pytest.mark.skipif(not TRITON_ON_CPU, reason="on a GPU: test_gpu_kernels compares fresh processes")


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=[NEEDS_TRITON, ON_THE_CPU_ONLY])])
def test_float32_gradients_are_the_same_bits_run_to_run_on_the_cpu(backend):
    tests = os.path.dirname(__file__)
    digests = {subprocess.run([sys.executable, "-c", RUN_TWICE, tests, backend], capture_output=True, text=True,
                              check=True, env=dict(os.environ)).stdout.strip().splitlines()[-1] for _ in range(2)}
    assert len(digests) == 1


@NEEDS_TRITON
@pytest.mark.skipif(not TRITON_ON_CPU, reason="on a GPU the compiled kernels run these shapes (test_gpu_kernels)")
def test_nearest_prototype_at_sm90_tiles(monkeypatch):
    import torch.nn.functional as F

    import spml_fast.triton_kernels.configs as configs
    from spml_fast import nearest_prototype
    from spml_fast.ops.reference import nearest_prototype_dense
    monkeypatch.setattr(configs, "architecture", lambda device: "sm90")
    config = configs.nearest_config(torch.device("cpu"), 64)
    gen = torch.Generator().manual_seed(0)
    embeddings = F.normalize(torch.randn(2 * config.block_n + 7, 48, generator=gen), dim=1)
    prototypes = F.normalize(torch.randn(3 * config.block_m + 3, 48, generator=gen), dim=1)
    indices, values = nearest_prototype(embeddings, prototypes, 20, backend="triton")
    expected_indices, expected_values = nearest_prototype_dense(embeddings, prototypes, 20)
    torch.testing.assert_close(values, expected_values, rtol=1e-6, atol=1e-6)
    assert torch.equal(indices, expected_indices)
