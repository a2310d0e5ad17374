"""Shared builders for the op tests: random pixel/segment problems in every
label mode, and the backends/devices to run them on."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

from spml_fast.ops.dispatch import interpreting

CUDA = torch.cuda.is_available()
TRITON_ON_CPU = interpreting()
if os.environ.get("PYTEST_XDIST_WORKER"):      # `make test` runs two workers: one torch thread each
    torch.set_num_threads(1)


NEEDS_TRITON = pytest.mark.skipif(not (CUDA or TRITON_ON_CPU),
                                  reason="triton backend needs a GPU or TRITON_INTERPRET=1 (make test sets it)")


def backend_params():
    """torch always; triton when it can run (CUDA, or the interpreter on CPU)."""
    return ["torch", pytest.param("triton", marks=NEEDS_TRITON)]


def device_for(backend: str) -> str:
    """CPU unless the triton backend runs without the interpreter (then CUDA)."""
    return "cuda" if backend == "triton" and not TRITON_ON_CPU else "cpu"


@dataclass
class Problem:
    embeddings: torch.Tensor           # [N, D]
    prototypes: torch.Tensor           # [M, D]
    segment: torch.Tensor              # [N]
    pixel_labels: torch.Tensor         # [N] or [N, W]
    prototype_labels: torch.Tensor     # [M] or [M, W]
    groups: dict = field(default_factory=dict)

    def args(self):
        return (self.embeddings, self.prototypes, self.segment, self.pixel_labels, self.prototype_labels)

    def leaf(self, dtype: Optional[torch.dtype] = None):
        """Fresh leaf tensors (optionally cast) requiring grad."""
        dtype = dtype or self.embeddings.dtype
        return (self.embeddings.detach().to(dtype).requires_grad_(),
                self.prototypes.detach().to(dtype).requires_grad_())


def make_problem(num_pixels=150, num_segments=45, dim=24, mode="single", num_classes=5, num_words=2,
                 num_groups=3, unlabelled=0.2, dtype=torch.float32, device="cpu", seed=0) -> Problem:
    """mode: "single", "set", "single+groups" or "set+groups". Sizes default to non-multiples of tiles."""
    gen = torch.Generator().manual_seed(seed)
    embeddings = F.normalize(torch.randn(num_pixels, dim, generator=gen), dim=1)
    prototypes = F.normalize(torch.randn(num_segments, dim, generator=gen), dim=1)
    segment = torch.randint(0, num_segments, (num_pixels,), generator=gen)
    if mode.startswith("set"):
        # random class sets over 64 * num_words classes, sparse so that both relations occur
        bits = torch.rand(num_pixels + num_segments, num_words * 64, generator=gen) < (2.0 / (num_words * 64))
        words = torch.zeros(num_pixels + num_segments, num_words, dtype=torch.int64)
        for bit in range(64):
            words |= bits[:, bit::64].to(torch.int64) << bit
        pixel_labels, prototype_labels = words[:num_pixels], words[num_pixels:]
    else:
        pixel_labels = torch.randint(0, num_classes, (num_pixels,), generator=gen)
        prototype_labels = torch.randint(0, num_classes, (num_segments,), generator=gen)
        pixel_labels[torch.rand(num_pixels, generator=gen) < unlabelled] = -1
        prototype_labels[torch.rand(num_segments, generator=gen) < unlabelled] = -1
    groups = {}
    if mode.endswith("groups"):
        groups = dict(pixel_groups=torch.randint(0, num_groups, (num_pixels,), generator=gen).to(device),
                      prototype_groups=torch.randint(0, num_groups, (num_segments,), generator=gen).to(device))
    return Problem(embeddings.to(device=device, dtype=dtype), prototypes.to(device=device, dtype=dtype),
                   segment.to(device), pixel_labels.to(device), prototype_labels.to(device), groups)


MODES = ["single", "set", "single+groups", "set+groups"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield


def pytest_report_header(config):
    return f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')} cuda={CUDA}"


@pytest.fixture(scope="session")
def deploy_run(tmp_path_factory):
    """A tiny pure-SPML run (no class head: it predicts with its bank) on the built-in data with its bank:
    (root, run dir, bank path).

    Trained on the tiled PyTorch path (the interpreter would take many minutes; the
    kernels have tests of their own) for enough iterations that the embedding
    separates the textures: a barely trained
    network maps many pixels to near-identical embeddings, whose k-NN votes
    then hinge on float rounding."""
    from spml_fast.bank import build_run_bank, save_bank
    from spml_fast.ops.dispatch import use_backend
    from spml_fast.config import PRESETS, apply_overrides
    from spml_fast.synth import SynthConfig, write_dataset
    from spml_fast.train import train
    root = tmp_path_factory.mktemp("deploy")
    data, run, bank = str(root / "data"), str(root / "run"), str(root / "bank.safetensors")
    write_dataset(data, SynthConfig(train_images=12, val_images=3, size=48), progress=False)
    config = apply_overrides(PRESETS["synthetic-scribble-spml"], {
        "data_root": data, "optim.iterations": 60, "optim.batch": 4, "optim.warmup": 5, "augment.crop": 48,
        "workers": 0, "checkpoint_every": 60, "model.width": 8, "model.embedding_dim": 16, "kmeans_grid": 3,
        "bank_grid": 4})
    with use_backend("torch"):
        train(config, run, progress=False)
        save_bank(build_run_bank(run, progress=False), bank)
    return data, run, bank
