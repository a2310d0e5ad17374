"""Which implementation runs an op.

``auto`` picks the Triton kernels for CUDA tensors, and for CPU tensors when
``TRITON_INTERPRET=1`` (Triton's interpreter: how the tests cover the kernels
without a GPU); otherwise the tiled PyTorch path. float64 inputs (gradcheck)
always take the PyTorch path, as do embedding widths above the kernels'
single-tile limit.
"""
from __future__ import annotations

import contextlib
import contextvars
import os

import torch

BACKENDS = ("auto", "triton", "torch")

# The Triton kernels hold a whole embedding row in one tile (BLOCK_D = next
# power of two >= D); beyond this width the registers spill (the static
# kernel report: dP at D = 512), so wider embeddings take the tiled PyTorch path.
MAX_TRITON_DIM = 256


# What "auto" resolves to inside ``use_backend`` (None: the rule above).
_AUTO_OVERRIDE: contextvars.ContextVar = contextvars.ContextVar("spml_fast_backend", default=None)


@contextlib.contextmanager
def use_backend(backend: str):
    """Within the block, ops called with backend="auto" use ``backend`` ("triton" | "torch"),
    e.g. the tiled PyTorch path for a quick CPU run while TRITON_INTERPRET=1 is set for tests."""
    if backend not in ("triton", "torch"):
        raise ValueError(f"backend must be 'triton' or 'torch', got {backend!r}")
    token = _AUTO_OVERRIDE.set(backend)
    try:
        yield
    finally:
        _AUTO_OVERRIDE.reset(token)


def interpreting() -> bool:
    """True when Triton kernels run through Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("triton") is not None


def select_backend(backend: str, reference: torch.Tensor) -> str:
    """Resolve ``backend`` ("auto" | "triton" | "torch") for inputs like ``reference`` [rows, D]."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    triton_ok = (triton_available() and (reference.is_cuda or interpreting())
                 and reference.dtype != torch.float64 and reference.shape[-1] <= MAX_TRITON_DIM)
    if backend == "triton":
        if not triton_ok:
            raise ValueError("backend='triton' needs triton installed, CUDA tensors or TRITON_INTERPRET=1, "
                             f"a dtype other than float64 and D <= {MAX_TRITON_DIM} "
                             f"(got device {reference.device}, dtype {reference.dtype}, D {reference.shape[-1]})")
        return "triton"
    if backend == "torch" or _AUTO_OVERRIDE.get() == "torch":
        return "torch"
    if _AUTO_OVERRIDE.get() == "triton":
        return select_backend("triton", reference)
    return "triton" if triton_ok else "torch"


def accumulation_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float32 for float32 / bfloat16 / float16 inputs; float64 stays float64 (gradcheck)."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


TREE_BACKENDS = ("auto", "host", "triton")


def select_tree_backend(backend: str, reference: torch.Tensor) -> str:
    """Resolve ``backend`` for the spanning-tree ops ("host" | "triton"). Their kernels walk a tree node by
    node, far too slow for Triton's interpreter on real sizes, so "auto" takes Triton only for CUDA tensors
    or inside ``use_backend("triton")`` (the tests and the host-cost benchmark), never merely because
    TRITON_INTERPRET=1 is set."""
    if backend not in TREE_BACKENDS:
        raise ValueError(f"backend must be one of {TREE_BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    return "triton" if reference.is_cuda or _AUTO_OVERRIDE.get() == "triton" else "host"

