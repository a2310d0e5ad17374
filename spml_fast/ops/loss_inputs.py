"""What a pixel-to-segment loss call carries besides the two differentiable tensors (shared by the
tiled PyTorch engine, the Triton glue and the autograd wrapper)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _validate as check
from .tiling import DEFAULT, TileConfig


@dataclass(frozen=True)
class LossInputs:
    """Everything of a loss call except the two differentiable tensors."""

    segment: torch.Tensor              # [N] int64 in [0, M)
    labels: check.Labels
    kappa: float
    tiles: TileConfig = DEFAULT
