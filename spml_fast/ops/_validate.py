"""Input checks shared by the pixel-to-segment ops.

Every public op validates its arguments here *before* any kernel runs, so bad
input becomes a ``ValueError`` naming the argument instead of an
out-of-bounds read inside a kernel. Shapes, dtypes and devices are checked on
the host; value ranges with one device-side assertion (``RangeChecks``), which
reads nothing back: on the CPU it raises at once, on CUDA the stream stops
with a device-side assert before any kernel reads the value (as PyTorch's
own index checks do), and a loss call never waits for the GPU.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Optional

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
REDUCTIONS = ("mean", "sum", "none")
MAX_LABEL = 2 ** 31 - 1        # class ids below this (single-label mode)
MAX_GROUP = 2 ** 30            # group ids in [-MAX_GROUP, MAX_GROUP): the visit plan packs them in 32 bits


def require_tensor(name: str, tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")


def check_matrix(name: str, tensor, rows: Optional[int] = None, cols: Optional[int] = None) -> None:
    """A non-empty 2-D floating tensor, optionally with a given shape."""
    require_tensor(name, tensor)
    if tensor.dim() != 2:
        raise ValueError(f"{name} must be 2-D [rows, D], got shape {tuple(tensor.shape)}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16, float16 or float64, got {tensor.dtype}")
    if tensor.shape[0] == 0 or tensor.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(tensor.shape)}")
    if rows is not None and tensor.shape[0] != rows:
        raise ValueError(f"{name} has {tensor.shape[0]} rows, expected {rows}")
    if cols is not None and tensor.shape[1] != cols:
        raise ValueError(f"{name} has D = {tensor.shape[1]}, expected D = {cols} (as the embeddings)")


def check_same_kind(name: str, tensor: torch.Tensor, like_name: str, like: torch.Tensor) -> None:
    if tensor.dtype != like.dtype:
        raise ValueError(f"{name} has dtype {tensor.dtype} but {like_name} has {like.dtype}: use one dtype")
    if tensor.device != like.device:
        raise ValueError(f"{name} is on {tensor.device} but {like_name} is on {like.device}")


def check_index_vector(name: str, tensor, length: int, device: torch.device,
                       upper: Optional[int] = None, allow_negative: bool = False,
                       ranges: Optional["RangeChecks"] = None) -> torch.Tensor:
    """A 1-D integer tensor of ``length`` entries; returns it as contiguous int64."""
    require_tensor(name, tensor)
    if tensor.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(tensor.shape)}")
    if tensor.dtype not in INT_DTYPES:
        raise ValueError(f"{name} must be an integer tensor, got {tensor.dtype}")
    if tensor.shape[0] != length:
        raise ValueError(f"{name} has {tensor.shape[0]} entries, expected {length}")
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device}, expected {device}")
    tensor = tensor.to(torch.int64).contiguous()
    if upper is not None and length > 0:
        with collected(ranges) as checks:
            checks.add(name, tensor, None if allow_negative else 0, upper)
    return tensor


class RangeChecks:
    """Value-range checks of one call, asserted together on the device: one assertion, nothing read back.
    On the CPU a failure raises at once, naming the argument and the values found."""

    def __init__(self):
        self.items = []

    def add(self, name: str, tensor: torch.Tensor, low: Optional[int], high: int) -> None:
        """All values of the 1-D ``tensor`` in [low, high) (no lower bound for low=None)."""
        inside = tensor < high if low is None else tensor.clamp(low, high - 1) == tensor
        self.items.append((name, tensor, low, high, inside))

    def assert_all(self) -> None:
        if not self.items:
            return
        try:
            torch._assert_async(torch.cat([item[-1] for item in self.items]).all(),
                                "an index or label argument holds values out of range")
        except RuntimeError:
            for name, tensor, low, high, inside in self.items:
                if not bool(inside.all()):
                    bounds = f"[{low}, {high})" if low is not None else f"(-inf, {high})"
                    raise ValueError(f"{name} holds values in [{int(tensor.min())}, {int(tensor.max())}], "
                                     f"outside {bounds}") from None
            raise


@contextlib.contextmanager
def collected(ranges: Optional[RangeChecks]):
    """The caller's checks to add to (asserted when it is done), or checks of their own asserted at the
    end of the block."""
    checks = RangeChecks() if ranges is None else ranges
    yield checks
    if ranges is None:
        checks.assert_all()


def check_kappa(kappa) -> float:
    if isinstance(kappa, torch.Tensor):
        if kappa.numel() != 1:
            raise ValueError(f"kappa must be a scalar, got shape {tuple(kappa.shape)}")
        kappa = float(kappa)
    try:
        kappa = float(kappa)
    except (TypeError, ValueError):
        raise ValueError(f"kappa must be a number, got {kappa!r}") from None
    if not math.isfinite(kappa) or kappa <= 0:
        raise ValueError(f"kappa must be finite and positive, got {kappa}")
    return kappa


@dataclass(frozen=True)
class Labels:
    """Validated label tensors of one loss call.

    pixel / prototype: [N] / [M] int64 class ids (-1 = unlabelled) in
    single-label mode, or [N, W] / [M, W] int64 bit sets in set mode.
    pixel_groups / prototype_groups: [N] / [M] int64, or both None.
    """

    pixel: torch.Tensor
    prototype: torch.Tensor
    pixel_groups: Optional[torch.Tensor]
    prototype_groups: Optional[torch.Tensor]

    @property
    def set_mode(self) -> bool:
        return self.pixel.dim() == 2

    @property
    def num_words(self) -> int:
        return self.pixel.shape[1] if self.set_mode else 1


def check_labels(pixel_labels, prototype_labels, num_pixels: int, num_prototypes: int,
                 device: torch.device, ranges: Optional[RangeChecks] = None) -> tuple[torch.Tensor, torch.Tensor]:
    for name, tensor in (("pixel_labels", pixel_labels), ("prototype_labels", prototype_labels)):
        require_tensor(name, tensor)
        if tensor.dim() not in (1, 2):
            raise ValueError(f"{name} must be [rows] class ids or [rows, W] int64 bit sets, "
                             f"got shape {tuple(tensor.shape)}")
        if tensor.device != device:
            raise ValueError(f"{name} is on {tensor.device}, expected {device}")
    if pixel_labels.dim() != prototype_labels.dim():
        raise ValueError("pixel_labels and prototype_labels mix label modes: "
                         f"shapes {tuple(pixel_labels.shape)} and {tuple(prototype_labels.shape)} "
                         "(use [N]/[M] class ids or [N, W]/[M, W] bit sets for both)")
    if pixel_labels.shape[0] != num_pixels:
        raise ValueError(f"pixel_labels has {pixel_labels.shape[0]} rows, expected N = {num_pixels}")
    if prototype_labels.shape[0] != num_prototypes:
        raise ValueError(f"prototype_labels has {prototype_labels.shape[0]} rows, expected M = {num_prototypes}")
    if pixel_labels.dim() == 2:
        for name, tensor in (("pixel_labels", pixel_labels), ("prototype_labels", prototype_labels)):
            if tensor.dtype != torch.int64:
                raise ValueError(f"{name} as bit sets must be int64, got {tensor.dtype}")
        if pixel_labels.shape[1] != prototype_labels.shape[1] or pixel_labels.shape[1] == 0:
            raise ValueError(f"pixel_labels has W = {pixel_labels.shape[1]} words but prototype_labels "
                             f"has W = {prototype_labels.shape[1]}")
    else:
        for name, tensor in (("pixel_labels", pixel_labels), ("prototype_labels", prototype_labels)):
            if tensor.dtype not in INT_DTYPES:
                raise ValueError(f"{name} must be an integer tensor, got {tensor.dtype}")
            if tensor.dtype == torch.int64 and tensor.numel():
                with collected(ranges) as checks:               # the visit plan packs label + 1 in 32 bits
                    checks.add(name, tensor, None, MAX_LABEL)
    return pixel_labels.to(torch.int64).contiguous(), prototype_labels.to(torch.int64).contiguous()


def check_groups(pixel_groups, prototype_groups, num_pixels: int, num_prototypes: int,
                 device: torch.device, ranges: Optional[RangeChecks] = None
                 ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    if (pixel_groups is None) != (prototype_groups is None):
        missing = "prototype_groups" if prototype_groups is None else "pixel_groups"
        raise ValueError(f"{missing} is None but the other group tensor is given: pass both or neither")
    if pixel_groups is None:
        return None, None
    groups = (check_index_vector("pixel_groups", pixel_groups, num_pixels, device),
              check_index_vector("prototype_groups", prototype_groups, num_prototypes, device))
    with collected(ranges) as checks:
        for name, tensor in zip(("pixel_groups", "prototype_groups"), groups):
            if tensor.numel():
                checks.add(name, tensor, -MAX_GROUP, MAX_GROUP)     # negative: a group no pixel has, say
    return groups


def check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction
