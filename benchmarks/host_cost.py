"""What a piece of code asks of the host: the ATen operators it dispatches
and those among them that synchronise a GPU with the host, counted with a
``TorchDispatchMode`` (on any device: the count is the same on the CPU, where
nothing waits, as on CUDA, where each sync stalls the launch queue).

Synchronising: reading a value back (``.item()``, ``bool(t)``, ``.tolist()``:
``aten._local_scalar_dense``), ops whose output size depends on the data
(``nonzero``, boolean-mask indexing and assignment, ``masked_select``,
``unique``, ``repeat_interleave`` without an output size) and copies from a
CUDA tensor to the host.

    with HostCost() as cost:
        loss = compute(...); loss.backward()
    cost.aten_calls, cost.sync_ops, cost.by_op
"""
from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ALWAYS_SYNC = {"_local_scalar_dense", "nonzero", "masked_select", "_unique", "_unique2", "unique_dim",
               "unique_consecutive", "item", "is_nonzero", "equal", "masked_scatter"}
INDEX_OPS = {"index", "index_put", "index_put_", "_index_put_impl_"}


def _is_bool(value) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == torch.bool


def syncs(name: str, args, kwargs) -> bool:
    """Whether the ATen op ``name`` (without its namespace and overload) with these arguments makes the
    host wait for the device."""
    if name in ALWAYS_SYNC:
        return True
    if name in INDEX_OPS and len(args) > 1 and isinstance(args[1], (list, tuple)):
        return any(_is_bool(index) for index in args[1])
    if name == "repeat_interleave":
        return "output_size" not in kwargs
    if name in ("_to_copy", "copy_", "to"):
        source = args[1] if name == "copy_" else args[0]
        target = args[0] if name == "copy_" else kwargs.get("device")
        target_device = target.device if isinstance(target, torch.Tensor) else target
        return (isinstance(source, torch.Tensor) and source.is_cuda and target_device is not None
                and torch.device(target_device).type == "cpu")
    return False


class HostCost(TorchDispatchMode):
    """Counts ATen calls (``aten_calls``), synchronising ones (``sync_ops``) and both by operator name
    (``by_op``, ``sync_by_op``) while active."""

    def __init__(self):
        super().__init__()
        self.by_op: Counter = Counter()
        self.sync_by_op: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        self.by_op[name] += 1
        if syncs(name, args, kwargs):
            self.sync_by_op[name] += 1
        return func(*args, **kwargs)

    @property
    def aten_calls(self) -> int:
        return sum(self.by_op.values())

    @property
    def sync_ops(self) -> int:
        return sum(self.sync_by_op.values())
