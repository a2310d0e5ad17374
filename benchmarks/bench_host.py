"""What the loss asks of the host, with its GPU work taken away: every Triton
launch replaced by a no-op (the Triton path, on CPU tensors), the rest of the
call as it runs on a GPU. Per case, one forward + backward:

- ``aten_calls``: ATen operators dispatched (``host_cost.HostCost``);
- ``sync_ops``: those that would make the host wait for a GPU (``.item()``,
  ``nonzero``, ``unique``, boolean indexing, ``repeat_interleave`` with
  tensor counts, ...), by operator in ``sync_by_op``;
- ``host_ms``: the time of the call on this CPU (median of the repeats):
  everything but the kernels, tensor ops included, which on a GPU run on
  the device, queued; an upper bound of the host's share there.

Cases: the loss at the standard size (N = 262,144 pixels from 8 images,
M = 8,192 segments, 21 classes, D = 64, bf16; single label, tag sets,
groups) and one training step of the SPML preset (``synthetic-scribble-spml``:
relations I, C, O with the memory bank, two images) at crop 512, where only
the loss takes its stubbed Triton path and the network, the k-means and the
prototypes run their CPU path (their outputs index the loss's inputs, so
they need real values): its counts are the whole step's.

    spml-fast bench host [--quick] [--json FILE]
"""
from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import asdict, dataclass, field, replace

import torch

from .bench_loss import _case, make_inputs
from .host_cost import HostCost

KERNELS = {"pixel_segment_fwd": ("pixel_segment_lse_kernel",),
           "pixel_segment_bwd": ("grad_embeddings_kernel", "grad_prototypes_kernel"),
           "segment_sum": ("segment_sum_kernel",), "nearest_prototype": ("nearest_prototype_kernel",),
           "spanning_tree": ("edge_distance_kernel", "boruvka_kernel", "euler_kernel", "rank_kernel",
                             "parent_kernel", "order_kernel"),
           "tree_filter": ("tree_filter_kernel",)}


@dataclass
class HostRecord:
    case: str
    aten_calls: int
    sync_ops: int
    host_ms: float
    sync_by_op: dict = field(default_factory=dict)


class _NoLaunch:
    """A launch that does no work but leaves its float buffers at 1.0 (outside any dispatch mode, so the
    count does not see it): plausible values for what the step computes downstream. The caller's own
    tensors (those that require grad: the loss kernels read the original prototypes) are left alone."""

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            from torch.utils._python_dispatch import _disable_current_modes
            with _disable_current_modes():
                for value in args:
                    if isinstance(value, torch.Tensor) and value.is_floating_point() and not value.requires_grad:
                        value.fill_(1.0)
        return launch


def _uncounted_plan(*args):
    from torch.utils._python_dispatch import _disable_current_modes

    from spml_fast.ops.contrast_plan import visit_lists_reference
    with _disable_current_modes():
        return visit_lists_reference(*args)


@contextlib.contextmanager
def kernels_stubbed(loss_only: bool = False):
    """Within the block: the Triton launches of the library are no-ops, and the Triton path is taken for
    CPU tensors (as under the interpreter), so what runs is exactly the host side of the GPU path.
    ``loss_only``: only the loss's kernels and its path; every other op keeps its CPU path (a training
    step's k-means and prototypes need real values: their outputs index the loss's inputs)."""
    import importlib

    from spml_fast.ops import dispatch
    loss_module = importlib.import_module("spml_fast.ops.pixel_segment_loss")
    saved = []

    def patch(module, name, value):
        saved.append((module, name, getattr(module, name)))
        setattr(module, name, value)
    for module_name, names in KERNELS.items():
        if loss_only and not module_name.startswith("pixel_segment"):
            continue
        module = importlib.import_module(f"spml_fast.triton_kernels.{module_name}")
        for name in names:
            patch(module, name, _NoLaunch())
    # The visit plan's launches (three on a GPU) compute their result for real, with the same rule in
    # PyTorch and outside the count: the loss's visit plans stay real (reports read them).
    plan_module = importlib.import_module("spml_fast.ops.contrast_plan")
    patch(plan_module, "_launchable", lambda device: True)
    patch(importlib.import_module("spml_fast.triton_kernels.visit_plan"), "launch_visit_plan", _uncounted_plan)
    if loss_only:
        patch(loss_module, "select_backend", lambda backend, reference: "triton")
    else:
        patch(dispatch, "interpreting", lambda: True)
    try:
        with dispatch.use_backend("torch" if loss_only else "triton"):
            yield
    finally:
        for module, name, value in reversed(saved):
            setattr(module, name, value)


def loss_call(case: dict):
    from spml_fast import pixel_segment_loss
    inputs = make_inputs(case, "cpu")
    embeddings = inputs.pop("embeddings").requires_grad_()
    prototypes = inputs.pop("prototypes").requires_grad_()

    def call():
        loss = pixel_segment_loss(embeddings, prototypes, backend="triton", **inputs)
        torch.autograd.grad(loss, (embeddings, prototypes))
    return call


def spml_step(crop: int, images: int = 2):
    """One training step of the SPML preset (forward, relations, backward; no update)."""
    from spml_fast.config import PRESETS
    from .bench_objectives import prepared_batch
    from .bench_train_step import training_step
    config = PRESETS["synthetic-scribble-spml"]
    return training_step(config, prepared_batch(dict(crop=crop, batch=images), config, "cpu"), "cpu",
                         optimise=False)[1]


STEP = "spml-step"     # cases named so: a whole training step, only the loss on its (stubbed) Triton path


def cases(quick: bool) -> dict:
    if quick:
        return {"single-N16k-M1k-bf16": lambda: loss_call(_case("q", 16384, 1024, dtype="bfloat16", images=8)),
                f"{STEP}-crop128": lambda: spml_step(128)}
    standard = dict(num_pixels=262144, num_segments=8192, dtype="bfloat16", images=8)
    return {"single-N262k-M8k-bf16": lambda: loss_call(_case("s", **standard)),
            "set-N262k-M8k-bf16": lambda: loss_call(_case("s", mode="set", **standard)),
            "groups-N262k-M8k-bf16": lambda: loss_call(_case("s", mode="groups", **standard)),
            f"{STEP}-crop512": lambda: spml_step(512)}


def measure(name: str, make, repeats: int = 3) -> HostRecord:
    with kernels_stubbed(loss_only=name.startswith(STEP)):
        call = make()
        call()                                           # warm-up: caches, the memory bank
        with HostCost() as cost:
            call()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            times.append((time.perf_counter() - start) * 1e3)
    return HostRecord(name, cost.aten_calls, cost.sync_ops, round(statistics.median(times), 2),
                      dict(cost.sync_by_op))


def run(quick: bool = False, progress=None) -> list[HostRecord]:
    records = []
    for name, make in cases(quick).items():
        records.append(measure(name, make))
        if progress:
            progress(records[-1])
    return records


def to_markdown(records: list[HostRecord], environment: dict) -> str:
    lines = [f"Host cost of the Triton path with every launch a no-op ({environment.get('device', '')}, "
             f"{environment.get('threads', '')} threads, commit {environment.get('git_commit', '')}). "
             "Per forward + backward: ATen calls, synchronising operations, and the CPU time of everything "
             "but the kernels (on a GPU those tensor ops run on the device, queued: only the syncs make the host "
             "wait).", "",
             "| case | ATen calls | sync ops | host ms | sync ops by operator |", "|---|---|---|---|---|"]
    for record in records:
        by_op = ", ".join(f"{name} {count}" for name, count in sorted(record.sync_by_op.items()))
        lines.append(f"| {record.case} | {record.aten_calls} | {record.sync_ops} | {record.host_ms:.1f} | {by_op} |")
    return "\n".join(lines) + "\n"


def as_dicts(records: list[HostRecord]) -> list[dict]:
    return [asdict(record) for record in records]
