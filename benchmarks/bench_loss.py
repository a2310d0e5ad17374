"""Benchmark of pixel_segment_loss: forward + backward of the tiled
implementation against the dense formulation (the paper's code), same inputs.

Inputs model one SPML batch: B images, pixels labelled with one of K classes
(a share unlabelled), each pixel in a segment of its own image, the segment
labelled like its pixels. Implementations:
  dense  - pixel_segment_loss_dense (N x M logits and masks, autograd)
  dense-compiled - torch.compile of the dense formulation (inductor), where it compiles
  tiled  - pixel_segment_loss (Triton on CUDA, tiled PyTorch on the CPU)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from spml_fast import pixel_segment_loss
from spml_fast.ops.reference import pixel_segment_loss_dense

SUITE = "loss"
REPEATS = {False: 2}          # full CPU cases take ~15 s per dense call: 1 warm-up + 2 repeats
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _case(name, num_pixels, num_segments, dim=64, mode="single", dtype="float32", classes=21, images=4, kappa=10.0):
    return dict(name=name, N=num_pixels, M=num_segments, D=dim, mode=mode, dtype=dtype, classes=classes,
                images=images, kappa=kappa)


def cases(quick: bool, device: str) -> list[dict]:
    if quick:
        dtype = "bfloat16" if device == "cuda" else "float32"
        return [dict(_case("single-N16k-M1k", 16384, 1024, dtype=dtype), quick=True)]
    if device == "cuda":
        return [_case("single-N262k-M8k-bf16", 262144, 8192, dtype="bfloat16"),
                _case("set-N262k-M8k-bf16", 262144, 8192, mode="set", dtype="bfloat16"),
                _case("groups-N262k-M8k-bf16", 262144, 8192, mode="groups", dtype="bfloat16", images=8),
                _case("single-N1M-M16k-bf16", 1048576, 16384, dtype="bfloat16", images=16)]
    return [_case("single-N65k-M4k", 65536, 4096),
            _case("set-N65k-M4k", 65536, 4096, mode="set"),
            _case("groups-N65k-M4k", 65536, 4096, mode="groups")]


def make_inputs(case: dict, device: str, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    num_pixels, num_segments, images = case["N"], case["M"], case["images"]
    dtype = DTYPES[case["dtype"]]
    embeddings = F.normalize(torch.randn(num_pixels, case["D"], generator=gen), dim=1)
    prototypes = F.normalize(torch.randn(num_segments, case["D"], generator=gen), dim=1)
    pixel_image = torch.arange(num_pixels) * images // num_pixels
    segment_image = torch.arange(num_segments) * images // num_segments
    per_image = num_segments // images
    segment = pixel_image * per_image + torch.randint(0, per_image, (num_pixels,), generator=gen)
    segment_label = torch.randint(0, case["classes"], (num_segments,), generator=gen)
    segment_label[torch.rand(num_segments, generator=gen) < 0.3] = -1             # unlabelled segments
    inputs = dict(embeddings=embeddings.to(device=device, dtype=dtype),
                  prototypes=prototypes.to(device=device, dtype=dtype),
                  segment=segment.to(device), kappa=case["kappa"])
    if case["mode"] == "set":
        # Relation O: image tag sets (1-3 of the K - 1 foreground classes, one 64-bit word),
        # segments from the batch and a memory bank of two earlier batches (3 x images sources).
        sources = 3 * images
        segment_source = torch.arange(num_segments) * sources // num_segments
        counts = torch.randint(1, 4, (sources,), generator=gen)
        source_tags = torch.zeros(sources, dtype=torch.int64)
        for source in range(sources):
            classes = torch.randperm(case["classes"] - 1, generator=gen)[: int(counts[source])] + 1
            source_tags[source] = int((1 << classes).sum())
        segment = pixel_image * (num_segments // sources) + torch.randint(0, num_segments // sources,
                                                                          (num_pixels,), generator=gen)
        inputs.update(segment=segment.to(device), pixel_labels=source_tags[pixel_image][:, None].to(device),
                      prototype_labels=source_tags[segment_source][:, None].to(device))
    else:
        inputs.update(pixel_labels=segment_label[segment].to(device), prototype_labels=segment_label.to(device))
    if case["mode"] == "groups":
        inputs.update(pixel_groups=pixel_image.to(device), prototype_groups=segment_image.to(device))
    return inputs


def _forward_backward(loss_fn, case, device):
    inputs = make_inputs(case, device)
    embeddings = inputs.pop("embeddings").requires_grad_()
    prototypes = inputs.pop("prototypes").requires_grad_()

    def step():
        loss = loss_fn(embeddings, prototypes, **inputs)
        grads = torch.autograd.grad(loss, (embeddings, prototypes))
        return loss, grads
    return step


def _tiled(case, device):
    backend = "triton" if device == "cuda" else "torch"
    return _forward_backward(lambda *a, **k: pixel_segment_loss(*a, backend=backend, **k), case, device)


def _dense(case, device):
    return _forward_backward(pixel_segment_loss_dense, case, device)


def _dense_compiled(case, device):
    compiled = torch.compile(pixel_segment_loss_dense, dynamic=False)
    step = _forward_backward(compiled, case, device)
    step()                                        # compile outside the timing (the warm-up would too)
    return step


IMPLEMENTATIONS = {"dense": _dense, "dense-compiled": _dense_compiled, "tiled": _tiled}


def dense_bytes(case: dict) -> int:
    """Rough footprint of the dense formulation: ~6 live N x M float32 tensors plus bool masks."""
    return case["N"] * case["M"] * (6 * 4 + 6)


SIZE_LABEL = "N x M"


def size(case: dict) -> int:
    return case["N"] * case["M"]


def skip_reason(case: dict, impl: str, device: str):
    if impl == "tiled":
        return None
    if impl == "dense-compiled" and case.get("quick"):
        return "torch.compile's first call takes longer than the whole --quick run: measured in full runs only"
    if impl == "dense-compiled" and device == "cpu" and case["mode"] != "single":
        return "compiled peer measured on the single-label case on the CPU (keeps the CPU suite under 15 min)"
    available = (torch.cuda.get_device_properties(0).total_memory if device == "cuda"
                 else _physical_memory())
    if dense_bytes(case) > 0.9 * available:
        return f"dense needs ~{dense_bytes(case) / 2**30:.0f} GiB, the device has {available / 2**30:.0f} GiB"
    return None


def _physical_memory() -> int:
    import os
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def visit_plan(case: dict) -> dict:
    """The Triton kernels' visit plan of this case at the sm_90a tile sizes (built on the CPU): tile pairs
    visited against a dense sweep, uniform (unmasked) and masked."""
    from spml_fast.ops.contrast_plan import build_plan
    from spml_fast.triton_kernels.configs import CONTRAST
    inputs = make_inputs(case, "cpu")
    config = CONTRAST[("sm90", 64)]
    plan = build_plan(inputs["segment"], inputs["pixel_labels"], inputs["prototype_labels"],
                      inputs.get("pixel_groups"), inputs.get("prototype_groups"), config.block_n, config.block_m,
                      config.column_masked)
    return plan.describe()


def parity(case: dict, device: str) -> dict:
    """Max |tiled - dense| of the loss and both gradients on this case's inputs, and the visit plan."""
    plan = visit_plan(case)
    if skip_reason(case, "dense", device):
        return dict(status="skipped: dense does not fit", plan=plan)
    loss_t, (ge_t, gp_t) = _tiled(case, device)()
    loss_d, (ge_d, gp_d) = _dense(case, device)()
    return dict(status="ok", plan=plan, loss=float(loss_d.detach()),
                loss_abs_diff=float((loss_t.detach().float() - loss_d.detach().float()).abs()),
                grad_embeddings_max_abs_diff=float((ge_t.float() - ge_d.float()).abs().max()),
                grad_prototypes_max_abs_diff=float((gp_t.float() - gp_d.float()).abs().max()))


def summarize(records: list, options: dict) -> list[str]:
    """On a GPU: achieved TFLOP/s and the fraction of the device's roofline (``roofline``)."""
    from .roofline import FORMULA, loss_roofline
    if options.get("device_kind") != "cuda":
        return []
    lines = [f"Roofline ({FORMULA}):", ""]
    for record in records:
        if record.status != "ok":
            continue
        result = loss_roofline(record.params, record.time_s, options.get("device", ""))
        if result is None:
            return [f"Roofline: {options.get('device')} is not in benchmarks/roofline.py's table"]
        lines.append(f"- {record.case} {record.impl}: {result['tflops']:.1f} TFLOP/s, "
                     f"{result['roofline_fraction']:.1%} of the roofline ({result['bound']} bound)")
    return lines
