"""The compiled Triton kernels on a GPU. Skipped without one ("no GPU"): the
interpreter upcasts dot operands to float32, so only here do bf16 and fp16
run through the tensor cores. `make gpu-check` runs this file first."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import MODES, make_problem
from spml_fast import pixel_segment_loss
from spml_fast.ops.reference import pixel_segment_loss_dense

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                                reason="no GPU (or TRITON_INTERPRET=1): the compiled kernels need one")


def against_dense(problem, kappa, dtype):
    """(loss, dE, dP) of the Triton path on ``dtype`` inputs and of the float64 dense reference on the same
    rounded inputs."""
    results = []
    for compute, cast in (("triton", dtype), ("dense", torch.float64)):
        embeddings, prototypes = problem.leaf(dtype)
        if cast == torch.float64:
            embeddings = embeddings.detach().double().requires_grad_()
            prototypes = prototypes.detach().double().requires_grad_()
        args = (embeddings, prototypes, *problem.args()[2:])
        loss = (pixel_segment_loss(*args, kappa=kappa, backend="triton", **problem.groups) if compute == "triton"
                else pixel_segment_loss_dense(*args, kappa=kappa, **problem.groups))
        loss.backward()
        results.append((loss.double(), embeddings.grad.double(), prototypes.grad.double()))
    return results


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", MODES)
def test_tensor_core_path_at_ragged_sizes(dtype, mode):
    problem = make_problem(3001, 777, dim=64, mode=mode, dtype=torch.float32, device="cuda", num_groups=5)
    (loss, grad_e, grad_p), (loss_ref, grad_e_ref, grad_p_ref) = against_dense(problem, 10.0, dtype)
    torch.testing.assert_close(loss, loss_ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(grad_e, grad_e_ref, rtol=5e-2, atol=5e-3)
    torch.testing.assert_close(grad_p, grad_p_ref, rtol=5e-2, atol=5e-3)


def test_kappa_64_underflow_is_exact():
    problem = make_problem(4096, 512, dim=64, device="cuda", unlabelled=0.0)
    (loss, grad_e, _), (loss_ref, grad_e_ref, _) = against_dense(problem, 64.0, torch.float32)
    assert torch.isfinite(loss) and torch.isfinite(grad_e).all()
    torch.testing.assert_close(loss, loss_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad_e, grad_e_ref, rtol=1e-3, atol=1e-4)


def test_float16_with_many_segments():
    """M = 8,192: most softmax terms are tiny; cast to fp16 for the tensor-core dot they must not blow up."""
    problem = make_problem(4096, 8192, dim=64, device="cuda", unlabelled=0.1)
    (loss, grad_e, grad_p), (loss_ref, grad_e_ref, grad_p_ref) = against_dense(problem, 16.0, torch.float16)
    torch.testing.assert_close(loss, loss_ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(grad_e, grad_e_ref, rtol=5e-2, atol=5e-3)
    torch.testing.assert_close(grad_p, grad_p_ref, rtol=5e-2, atol=5e-3)


FRESH_PROCESS = r"""
import hashlib, torch, sys
sys.path.insert(0, sys.argv[1])
from conftest import make_problem
from spml_fast import pixel_segment_loss
dtype = getattr(torch, sys.argv[3])
problem = make_problem(65536, 4096, dim=64, mode=sys.argv[2], device="cuda", dtype=dtype, num_groups=8)
e, p = problem.leaf()
loss = pixel_segment_loss(e, p, *problem.args()[2:], kappa=10.0, backend="triton", **problem.groups)
loss.backward()
digest = hashlib.sha256()
for tensor in (loss, e.grad, p.grad):          # float32 inputs: float32 gradients, hashed before any cast
    digest.update(tensor.float().cpu().numpy().tobytes())
print(digest.hexdigest())
"""


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mode", ["single", "set+groups"])
def test_two_fresh_processes_give_the_same_bits(mode, dtype):
    """No atomics in the loss (the own-segment term is a sorted segment sum): float32 gradients are the
    same bits in two fresh processes."""
    tests = os.path.dirname(__file__)
    digests = [subprocess.run([sys.executable, "-c", FRESH_PROCESS, tests, mode, dtype], capture_output=True,
                              text=True, check=True).stdout.strip().splitlines()[-1] for _ in range(2)]
    assert digests[0] == digests[1]
