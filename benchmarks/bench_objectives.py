"""The cost of each training objective against the crop size: one full step
(network forward, the objective's terms, backward, SGD update) of the
built-in preset's network on the same batch, per objective, partial CE the
baseline. Batch: two images of S x S (the train-step suite's generator), 3 %
of the pixels labelled; the trees and maps that depend only on the sample
are prepared before the step, as the data loader's workers prepare them
(``objective.sample_preparer``).

Implementations are objectives: ``pce`` (partial CE), ``tel-agmm`` (the
default), ``spml`` (the relations, tiled), ``hybrid-tel``. The parity line of
each case is the host cost of one step per objective and per term: ATen
calls and synchronising operations counted with a ``TorchDispatchMode``
(``host_cost``), the second step of a fresh model.
"""
from __future__ import annotations

import torch

from .bench_train_step import _batch, training_step

SUITE = "objectives"
BASELINE = "pce"
OBJECTIVES = ("pce", "tel-agmm", "spml", "hybrid-tel")
BATCH = 2


def cases(quick: bool, device: str) -> list[dict]:
    crops = (128,) if quick else ((128, 256, 512) if device == "cpu" else (512, 1024))
    return [dict(name=f"crop-{crop}", crop=crop, batch=BATCH, repeats=3 if crop <= 256 else 2) for crop in crops]


def _config(objective: str):
    from spml_fast.config import PRESETS
    return PRESETS[f"synthetic-scribble-{objective}"]


def prepared_batch(case: dict, config, device: str) -> dict:
    """The suite's batch with what the data pipeline adds for ``config``'s objective."""
    from spml_fast.data import collate
    from spml_fast.objective import sample_preparer
    raw = _batch(case, "cpu")
    prepare = sample_preparer(config, 6)
    samples = [{key: value[i] for key, value in raw.items()} for i in range(case["batch"])]
    batch = collate([prepare(sample) for sample in samples] if prepare else samples)
    return {key: value.to(device) for key, value in batch.items()}


def _model_and_step(case: dict, objective: str, device: str):
    config = _config(objective)
    batch = prepared_batch(case, config, device)
    model, step = training_step(config, batch, device)
    return model, batch, config, step


def _implementation(objective: str):
    def make(case, device):
        step = _model_and_step(case, objective, device)[3]
        step()      # the memory bank gets an earlier batch; caches fill; not timed
        return step
    return make


IMPLEMENTATIONS = {objective: _implementation(objective) for objective in OBJECTIVES}


def host_costs(case: dict, objective: str, device: str) -> dict:
    """{"step": (aten, sync), term: (aten, sync)}: the loss and its backward of the second step (the
    optimiser's update not counted), and each head term alone (forward and backward from the class
    head's input on)."""
    from spml_fast.objective import HEAD_TERMS, compute, head_losses
    from .host_cost import HostCost
    model, batch, config, step = _model_and_step(case, objective, device)
    step()
    from spml_fast.relations import MemoryBank
    with HostCost() as cost:
        compute(model, batch, MemoryBank(config.relations.memory_bank), config, 6)[0].backward()
    costs = {"step": (cost.aten_calls, cost.sync_ops)}
    weights = {name: getattr(config.objective, name) for name in HEAD_TERMS}
    for term in [name for name, weight in weights.items() if weight]:
        embeddings = model(batch["image"]).detach().requires_grad_()
        with HostCost() as cost:
            value = head_losses(model.classifier(embeddings), embeddings, batch, config.objective, 6, {term})[term]
            value.backward()
        costs[term] = (cost.aten_calls, cost.sync_ops)
    return costs


def parity(case: dict, device: str) -> dict:
    """Per objective: ATen calls / synchronising operations of a step and of each head term."""
    out = dict(status="ok")
    for objective in OBJECTIVES:
        for part, (aten, sync) in host_costs(case, objective, device).items():
            out[f"{objective}.{part}.aten"] = aten
            out[f"{objective}.{part}.sync"] = sync
    return out


def summarize(records: list, options: dict) -> list[str]:
    """Per crop: each objective's step time as a multiple of the partial-CE step's."""
    lines = []
    for case in dict.fromkeys(r.case for r in records):
        times = {r.impl: r.time_s for r in records if r.case == case and r.status == "ok"}
        if times.get(BASELINE):
            ratios = ", ".join(f"{impl} {times[impl] / times[BASELINE]:.2f}x" for impl in OBJECTIVES
                               if impl != BASELINE and impl in times)
            lines.append(f"- {case}: step time as a multiple of partial CE's: {ratios}")
    return lines


SIZE_LABEL = "crop side (pixels)"


def size(case: dict) -> int:
    return case["crop"]
