"""Bad input to pixel_segment_loss raises ValueError naming the argument (docs/method.md, the loss)."""
import pytest
import torch

from conftest import make_problem
from spml_fast import pixel_segment_loss


def call(problem, **overrides):
    args = dict(embeddings=problem.embeddings, prototypes=problem.prototypes, segment=problem.segment,
                pixel_labels=problem.pixel_labels, prototype_labels=problem.prototype_labels, kappa=10.0)
    args.update(overrides)
    return pixel_segment_loss(**args)


@pytest.fixture
def problem():
    return make_problem(20, 7, dim=8)


@pytest.mark.parametrize("override,match", [
    (lambda p: dict(prototypes=torch.randn(7, 9)), "prototypes has D = 9"),
    (lambda p: dict(prototypes=p.prototypes.half()), "prototypes has dtype"),
    (lambda p: dict(embeddings=p.embeddings[:, :, None]), "embeddings must be 2-D"),
    (lambda p: dict(embeddings=torch.randn(0, 8), segment=torch.zeros(0, dtype=torch.int64),
                    pixel_labels=torch.zeros(0, dtype=torch.int64)), "embeddings is empty"),
    (lambda p: dict(prototypes=torch.randn(0, 8)), "prototypes is empty"),
    (lambda p: dict(embeddings=p.embeddings.long()), "embeddings must be float"),
    (lambda p: dict(segment=p.segment[:-1]), "segment has 19 entries"),
    (lambda p: dict(segment=p.segment.float()), "segment must be an integer"),
    (lambda p: dict(segment=torch.full((20,), 7)), r"segment holds values in \[7, 7\], outside \[0, 7\)"),
    (lambda p: dict(segment=torch.full((20,), -1)), "segment holds values"),
    (lambda p: dict(pixel_labels=p.pixel_labels[:-1]), "pixel_labels has 19 rows"),
    (lambda p: dict(prototype_labels=p.prototype_labels[:-1]), "prototype_labels has 6 rows"),
    (lambda p: dict(pixel_labels=torch.zeros(20, 1, dtype=torch.int64)), "mix label modes"),
    (lambda p: dict(pixel_labels=torch.zeros(20, 2, dtype=torch.int64),
                    prototype_labels=torch.zeros(7, 1, dtype=torch.int64)), "W = 2 words"),
    (lambda p: dict(pixel_labels=torch.zeros(20, 1, dtype=torch.int32),
                    prototype_labels=torch.zeros(7, 1, dtype=torch.int32)), "bit sets must be int64"),
    (lambda p: dict(pixel_labels=p.pixel_labels.float()), "pixel_labels must be an integer"),
    (lambda p: dict(kappa=float("nan")), "kappa must be finite"),
    (lambda p: dict(kappa=float("inf")), "kappa must be finite"),
    (lambda p: dict(kappa=0.0), "kappa must be finite and positive"),
    (lambda p: dict(kappa="big"), "kappa must be a number"),
    (lambda p: dict(reduction="avg"), "reduction must be"),
    (lambda p: dict(pixel_groups=torch.zeros(20, dtype=torch.int64)), "prototype_groups is None"),
    (lambda p: dict(pixel_groups=torch.zeros(19, dtype=torch.int64),
                    prototype_groups=torch.zeros(7, dtype=torch.int64)), "pixel_groups has 19"),
    (lambda p: dict(backend="cuda-magic"), "backend must be"),
])
def test_bad_input_names_the_argument(problem, override, match):
    with pytest.raises(ValueError, match=match):
        call(problem, **override(problem))


def test_triton_backend_unavailable_is_explained(problem, monkeypatch):
    """CPU tensors without the interpreter cannot run the Triton kernels, GPU or not."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' needs"):
        call(problem, backend="triton")


def test_float64_takes_torch_path_and_works(problem):
    loss = call(problem, embeddings=problem.embeddings.double(), prototypes=problem.prototypes.double())
    assert loss.dtype == torch.float64 and torch.isfinite(loss)
