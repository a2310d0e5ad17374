"""One full SPML training step against the crop size: embedding network
forward, SegSort clustering, the relations I, C, O (with a memory bank of two
earlier batches), backward and the SGD update, for the tiled loss and for the
dense formulation of the paper's code (``relations.loss_impl = "dense"``).

Batch: one image of S x S (the built-in preset's network: small backbone,
D = 32), a blocky class layout with 3% of the pixels labelled, and an
over-segmentation of 64 x 64 regions (about the region count felzenszwalb
gives on natural images of these sizes): the number of segments M grows with S^2 like N,
so the dense N x M matrices grow with S^4.

The summary reports, per implementation, the largest crop whose measured
peak stays under ``--memory-cap`` (default 8 GiB).
"""
from __future__ import annotations

import os
from dataclasses import replace

import torch
import torch.nn.functional as F

SUITE = "train-step"
BASELINE = "dense"
REGION = 64
LABELLED = 0.03


def cases(quick: bool, device: str) -> list[dict]:
    # full CPU list: 2048 costs ~95 s per tiled step here and would push the suite past 15 minutes
    # (measured once: benchmarks/results/cpu-2core.md); on a GPU it is cheap
    crops = (128, 256) if quick else ((256, 512, 1024, 1536) if device == "cpu" else (256, 512, 1024, 1536, 2048))
    return [dict(name=f"crop-{crop}", crop=crop, batch=1, repeats=2 if crop <= 512 else 1) for crop in crops]


def _batch(case, device):
    from spml_fast.data import tags_to_words
    generator = torch.Generator().manual_seed(0)
    crop, batch = case["crop"], case["batch"]
    coarse = torch.rand(batch, 3, crop // 32, crop // 32, generator=generator)
    image = F.interpolate(coarse, size=(crop, crop), mode="bilinear", align_corners=False)
    image = (image + 0.1 * torch.randn(batch, 3, crop, crop, generator=generator) - 0.45) / 0.225
    blocks = torch.randint(0, 6, (batch, 1, 4, 4), generator=generator).float()
    classes = F.interpolate(blocks, size=(crop, crop), mode="nearest")[:, 0].long()
    label = torch.where(torch.rand(batch, crop, crop, generator=generator) < LABELLED, classes,
                        torch.full_like(classes, 255))
    rows = torch.arange(crop) // REGION
    regions = rows[:, None] * (crop // REGION + 1) + rows[None, :]
    tags = torch.stack([torch.from_numpy(tags_to_words([c for c in classes[b].unique().tolist() if c], 6))
                        for b in range(batch)])
    return dict(image=image.to(device), label=label.to(device), overseg=regions.expand(batch, -1, -1).to(device),
                valid=torch.ones(batch, crop, crop, dtype=torch.bool, device=device), tags=tags.to(device))


def training_step(config, batch: dict, device: str, optimise: bool = True):
    """(model, step) for one full training step of ``config`` on ``batch`` (6 classes): forward, the
    objective, backward, and with ``optimise`` the SGD update; the memory bank gets each step's segments
    and ``image_ids`` advance per call. Shared by the train-step, objectives and host suites."""
    from spml_fast.objective import compute
    from spml_fast.relations import MemoryBank
    from spml_fast.train import SpmlModel
    torch.manual_seed(0)
    model = SpmlModel(config, 6).to(device).train()
    optimiser = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    bank = MemoryBank(config.relations.memory_bank)
    images = batch["image"].shape[0]
    counter = [0]

    def step():
        batch["image_ids"] = torch.arange(images, device=device) + counter[0] * images
        counter[0] += 1
        total, terms, local = compute(model, batch, bank, config, 6)
        if optimise:
            optimiser.zero_grad(set_to_none=True)
        total.backward()
        if optimise:
            optimiser.step()
        bank.push(local)
        if device == "cuda":
            torch.cuda.synchronize()
        return total.detach()
    return model, step


def _step(loss_impl: str):
    def make(case, device):
        from spml_fast.config import PRESETS
        config = PRESETS["synthetic-scribble-spml"]      # the relations alone: the N x M work
        config = replace(config, relations=replace(config.relations, loss_impl=loss_impl))
        step = training_step(config, _batch(case, device), device)[1]
        step()      # an earlier batch in the memory bank (the warm-up adds a second), not timed
        return step
    return make


IMPLEMENTATIONS = {"dense": _step("dense"), "tiled": _step("tiled")}


def dense_bytes(case: dict) -> int:
    """Rough footprint of the dense relations: ~6 live N x M float32 tensors and masks per relation,
    M about 3 x (regions + label splits) with the memory bank."""
    pixels = case["batch"] * (case["crop"] // 4) ** 2
    segments = 3 * case["batch"] * ((case["crop"] // REGION) + 1) ** 2 * 2
    return pixels * segments * 30 * 2


def skip_reason(case: dict, impl: str, device: str):
    if impl != "dense":
        return None
    available = (torch.cuda.get_device_properties(0).total_memory if device == "cuda"
                 else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    if dense_bytes(case) > 0.8 * available:
        return f"dense needs ~{dense_bytes(case) / 2**30:.0f} GiB, the device has {available / 2**30:.0f} GiB"
    return None


def parity(case: dict, device: str) -> dict:
    """Total loss of the first step, dense against tiled, same weights and batch."""
    if skip_reason(case, "dense", device):
        return dict(status="skipped: dense does not fit")
    losses = {}
    for impl in ("dense", "tiled"):
        from spml_fast.config import PRESETS
        from spml_fast.relations import MemoryBank
        from spml_fast.objective import compute
        from spml_fast.train import SpmlModel
        config = PRESETS["synthetic-scribble-spml"]      # the relations alone: the N x M work
        config = replace(config, relations=replace(config.relations, loss_impl=impl))
        torch.manual_seed(0)
        model = SpmlModel(config, 6).to(device).train()
        batch = dict(_batch(case, device), image_ids=torch.arange(case["batch"], device=device))
        total, _, _ = compute(model, batch, MemoryBank(2), config, 6)
        losses[impl] = float(total)
    return dict(status="ok", loss=losses["dense"], loss_abs_diff=abs(losses["dense"] - losses["tiled"]))


def summarize(records: list, options: dict) -> list[str]:
    """The largest crop whose peak memory stays under the cap, per implementation."""
    cap = options.get("memory_cap_mb", 8192)
    lines = []
    for impl in IMPLEMENTATIONS:
        fitting = [r.params["crop"] for r in records
                   if r.impl == impl and r.status == "ok" and r.peak_mem_mb is not None and r.peak_mem_mb <= cap]
        over = [r.params["crop"] for r in records if r.impl == impl and r.params["crop"] not in fitting]
        largest = max(fitting) if fitting else None
        note = f" (next measured or skipped crop: {min(c for c in over if c > largest)})" if largest and any(
            c > largest for c in over) else ""
        lines.append(f"- largest crop under the {cap / 1024:.0f} GiB cap, {impl}: "
                     f"{largest if largest else 'none of the measured crops'}{note}")
    return lines


SIZE_LABEL = "crop side (pixels)"


def size(case: dict) -> int:
    return case["crop"]
