"""``spml-fast experiments --suite robustness``: every objective on families
of built-in scenes that differ in what a method could have been tuned to.

A family is a scene configuration (``synth.SynthConfig``: what tells the
classes apart, dataset size, stroke width and placement, clutter) and the
annotation list trained on (scribbles, points, box-fill pseudo-labels).
Each (family, objective, seed) trains for ``iterations`` and is evaluated on
the family's validation split twice: with the run's predictor alone and
followed by the dense CRF (``crf``). Cells report the mean over seeds and
the spread (half the range).

Everything lands under ``--out``: ``data/<family>/``, ``runs/<family>/<objective>-s<seed>/``
(each with its ``result.json``: a finished cell is never recomputed, a
killed suite resumes), ``results.json``, ``results.md`` and
``robustness.png``. Jobs run in parallel processes (``jobs``), one torch
thread each: a run's numbers do not depend on how many run beside it.
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from multiprocessing import get_context
from typing import Optional

from .config import OBJECTIVES as NAMED_OBJECTIVES
from .synth import SynthConfig

# objective name (config.OBJECTIVES) -> its preset on the built-in data's recipe
OBJECTIVES = {name: f"synthetic-scribble-{name}" for name in NAMED_OBJECTIVES}
BASELINE = "pce"


@dataclass(frozen=True)
class Family:
    scenes: SynthConfig
    train_list: str = "train_scribble.txt"
    note: str = ""
    dataset: str = "synth"      # "synth": the generator with ``scenes``; else a real dataset (real_data.DATASETS)
    budget: int = 1             # trains for budget x the suite's iterations (a family too hard to learn in them)


# outlines are the class; colour and pattern are random per object
SHAPE_SCENES = SynthConfig(cue="shape", shading=0.0, scribble_margin=0.0, scribble_width=1)

FAMILIES = {
    "built-in": Family(SynthConfig(), note="colour+texture classes, shaded, 1-px strokes through the middle"),
    "built-in, 60 images": Family(SynthConfig(train_images=60)),
    "built-in, 500 images": Family(SynthConfig(train_images=500)),
    "flat, strokes anywhere": Family(SynthConfig(shading=0.0, scribble_margin=0.0),
                                     note="the earlier built-in data, where SPML and pce tied"),
    "colour, blobs, clutter": Family(SynthConfig(cue="colour", outlines="blobs", clutter=4, shading=0.0,
                                                 scribble_margin=0.0, train_images=100),
                                     note="classes by hue; irregular blobs; distractors; 1-px curved strokes"),
    "texture, random colour": Family(SynthConfig(cue="texture", shading=0.0, scribble_margin=0.0,
                                                 scribble_width=1), note="3-px curved strokes"),
    "shape, random colour": Family(SHAPE_SCENES, note="random pattern too; 3-px curved strokes"),
    "shape, random colour, 3x iterations": Family(
        SHAPE_SCENES, budget=3,
        note="the family above trained three times as long: at the suite's budget no objective learns the shapes"),
    "texture+shape, 60 images, lines": Family(
        SynthConfig(cue="texture+shape", classes=3, max_objects=3, train_images=60, val_images=20, stroke="line",
                    scribble_width=1, scribble_per_class=True, shading=0.0, scribble_margin=0.0),
        note="random colour; one 3-px straight line per class anywhere inside"),
    "points": Family(SynthConfig(), train_list="train_point.txt", note="one dilated point per object"),
    "nuclei": Family(SynthConfig(), dataset="nuclei",
                     note="real: stardist's fluorescence image, 128-px tiles, nucleus / background, 1-px strokes"),
    # the same data with every pixel labelled: how far partial labels are from the network's ceiling
    "built-in, full masks": Family(SynthConfig(), train_list="train_full.txt", note="ceiling of the built-in row"),
    "texture, random colour, full masks": Family(
        SynthConfig(cue="texture", shading=0.0, scribble_margin=0.0, scribble_width=1), train_list="train_full.txt",
        note="ceiling of the texture row"),
    "texture+shape, 60 images, lines, full masks": Family(
        SynthConfig(cue="texture+shape", classes=3, max_objects=3, train_images=60, val_images=20, stroke="line",
                    scribble_width=1, scribble_per_class=True, shading=0.0, scribble_margin=0.0),
        train_list="train_full.txt", note="ceiling of the texture+shape row"),
    "nuclei, full masks": Family(SynthConfig(), dataset="nuclei", train_list="train_full.txt",
                                 note="ceiling of the nuclei row"),
    "boxes (box-fill)": Family(SynthConfig(), train_list="train_boxfill.txt",
                               note="box-fill pseudo-labels: inside a box its class"),
}


CEILINGS = tuple(name for name in FAMILIES if name.endswith("full masks"))
ENCODERS = ("small", "mobilenet_v2", "efficientnet_lite0")   # small: the CPU network from scratch; else ImageNet


@dataclass(frozen=True)
class SuiteConfig:
    iterations: int = 400
    seeds: tuple = (0, 1)
    jobs: int = 2
    families: tuple = tuple(name for name in FAMILIES if name not in CEILINGS)
    objectives: tuple = tuple(OBJECTIVES)
    scale: float = 1.0          # multiplies every family's image counts (quick runs and tests)
    backbone: str = "small"     # the encoder every cell trains (ENCODERS)


# About an hour on 2 CPU cores: half the iterations, without the 500-image and the longer-trained families.
QUICK = SuiteConfig(iterations=200, families=tuple(name for name, family in FAMILIES.items()
                                                   if name != "built-in, 500 images" and family.budget == 1
                                                   and name not in CEILINGS))


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def family_iterations(family: Family, config: "SuiteConfig") -> int:
    return config.iterations * family.budget


def family_scenes(family: Family, scale: float) -> SynthConfig:
    scenes = family.scenes
    return replace(scenes, train_images=max(2, round(scenes.train_images * scale)),
                   val_images=max(1, round(scenes.val_images * scale)))


@dataclass(frozen=True)
class Job:
    family: str
    objective: str
    seed: int
    data: str
    run_dir: str
    train_list: str
    iterations: int
    backbone: str = "small"


def one_thread() -> None:
    """Pool-worker initializer: one torch thread per job, so ``jobs`` runs share the cores without contention.

    Only the suite's own worker processes are changed; a caller running the jobs in-process (``jobs=1``)
    keeps its thread count, since resuming a run bit-exactly needs the same count as the run started with.
    """
    import torch
    torch.set_num_threads(1)


def finished_cell(run_dir: str) -> Optional[dict]:
    """The cached result of a finished cell (its ``result.json``), or None."""
    path = os.path.join(run_dir, "result.json")
    if not os.path.exists(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def run_job(job: Job) -> dict:
    """Train one cell (resumable) and evaluate it with and without the CRF; cached in result.json."""
    from .config import PRESETS, apply_overrides, on_pretrained_encoder
    from .evaluate import evaluate
    from .predictor import open_predictor
    from .io import save_json
    from .train import train
    cached = finished_cell(job.run_dir)
    if cached is not None:
        return cached
    preset = PRESETS[OBJECTIVES[job.objective]]
    if job.backbone != "small":
        preset = on_pretrained_encoder(preset, job.backbone)
    config = apply_overrides(preset, {
        "data_root": job.data, "train_list": job.train_list, "seed": job.seed, "workers": 0,
        "optim.iterations": job.iterations, "checkpoint_every": max(50, job.iterations // 4)})
    train(config, job.run_dir, resume="auto", progress=False)
    predictor = open_predictor(job.run_dir, build_bank=True, progress=False)
    val = predictor.run.dataset(data_root=job.data)
    result = dict(family=job.family, objective=job.objective, seed=job.seed, backbone=job.backbone)
    for key, crf in (("plain", False), ("crf", True)):
        scores = evaluate(predictor.with_settings(crf=crf), val, progress=False)
        result[key] = scores["mIoU"]
        result[key + "_per_class"] = scores["per_class"]
    save_json(os.path.join(job.run_dir, "result.json"), result)
    return result


def _check_names(config: SuiteConfig) -> None:
    unknown = [name for name in config.families if name not in FAMILIES]
    unknown += [name for name in config.objectives if name not in OBJECTIVES]
    if config.backbone not in ENCODERS:
        unknown.append(config.backbone)
    if unknown:
        raise ValueError(f"robustness suite: unknown families/objectives/backbone {unknown}; backbones: "
                         f"{', '.join(ENCODERS)}; families: "
                         f"{'; '.join(FAMILIES)}; objectives: {', '.join(OBJECTIVES)}")


def cell_dir(out: str, family: str, objective: str, seed: int, backbone: str = "small") -> str:
    folder = os.path.join(out, "runs", slug(family))
    return os.path.join(folder if backbone == "small" else os.path.join(folder, backbone), f"{objective}-s{seed}")


def run_suite(out: str, config: SuiteConfig = SuiteConfig(), progress: bool = True) -> dict:
    """Write the families' data, run every cell (``config.jobs`` at a time), write the report."""
    from tqdm import tqdm

    from .real_data import write_real_dataset
    from .synth import write_dataset
    _check_names(config)
    jobs = []
    for name in config.families:
        family = FAMILIES[name]
        data = os.path.join(out, "data", slug(name))
        if family.dataset == "synth":
            write_dataset(data, family_scenes(family, config.scale), progress=False)
        else:
            write_real_dataset(family.dataset, data)
        for objective in config.objectives:
            for seed in config.seeds:
                jobs.append(Job(name, objective, seed, data, cell_dir(out, name, objective, seed, config.backbone),
                                family.train_list, family_iterations(family, config), config.backbone))
    with tqdm(total=len(jobs), desc="robustness", unit="run", disable=not progress) as bar:
        if config.jobs <= 1:
            for job in jobs:
                run_job(job)
                bar.update()
        else:
            with ProcessPoolExecutor(config.jobs, mp_context=get_context("spawn"), initializer=one_thread) as pool:
                for _ in pool.map(run_job, jobs):
                    bar.update()
    return write_report(out, config)


def write_report(out: str, config: SuiteConfig = SuiteConfig()) -> dict:
    """results.json, results.md and robustness.png under ``out`` from the finished cells there (a cell not
    run yet shows as "-"), e.g. to report on part of a suite."""
    from .io import save_json, save_text
    _check_names(config)
    results = []
    for name in config.families:
        for objective in config.objectives:
            for seed in config.seeds:
                cached = finished_cell(cell_dir(out, name, objective, seed, config.backbone))
                if cached is not None:
                    results.append(cached)
    report = dict(config=dict(iterations=config.iterations, seeds=list(config.seeds), scale=config.scale,
                              backbone=config.backbone),
                  families={name: dict(note=FAMILIES[name].note, train_list=FAMILIES[name].train_list,
                                       dataset=FAMILIES[name].dataset,
                                       iterations=family_iterations(FAMILIES[name], config),
                                       scenes=vars(family_scenes(FAMILIES[name], config.scale)))
                            for name in config.families},
                  runs=results, summary=summarise(results, config))
    save_json(os.path.join(out, "results.json"), report)
    save_text(os.path.join(out, "results.md"), to_markdown(report))
    write_plot(report, os.path.join(out, "robustness.png"))
    return report


def summarise(results: list, config: SuiteConfig) -> dict:
    """{family: {objective: {"plain"|"crf": {"mean", "spread", "seeds"}}}}."""
    summary = {}
    for name in config.families:
        summary[name] = {}
        for objective in config.objectives:
            cells = [r for r in results if r["family"] == name and r["objective"] == objective]
            summary[name][objective] = {key: _stats([r[key] for r in cells]) for key in ("plain", "crf")}
    return summary


def _stats(values: list) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return dict(mean=None, spread=None, seeds=0)
    return dict(mean=sum(values) / len(values), spread=(max(values) - min(values)) / 2, seeds=len(values))


def default_objective() -> Optional[str]:
    """The objective of the preset a user reaches first (``synthetic-scribble``)."""
    from .config import PRESETS
    default = PRESETS["synthetic-scribble"].objective
    for name, preset in OBJECTIVES.items():
        if PRESETS[preset].objective == default:
            return name
    return None


def _table(report: dict, key: str) -> list[str]:
    summary = report["summary"]
    objectives = list(next(iter(summary.values())))
    default = default_objective()
    heads = [f"**{o}** (default)" if o == default else o for o in objectives]
    with_margin = default in objectives and BASELINE in objectives
    lines = ["| family | " + " | ".join(heads) + (f" | {default} - {BASELINE} |" if with_margin else " |"),
             "|---" * (len(objectives) + 1 + with_margin) + "|"]
    seeds = len(report["config"]["seeds"])
    for name, cells in summary.items():
        row = [_cell(cells[o][key], seeds) for o in objectives]
        best = max((cells[o][key]["mean"] or 0) for o in objectives)
        row = [f"**{text}**" if (cells[o][key]["mean"] or -1) == best else text for o, text in zip(objectives, row)]
        margin = ""
        if with_margin and None not in (cells[default][key]["mean"], cells[BASELINE][key]["mean"]):
            margin = f"{100 * (cells[default][key]['mean'] - cells[BASELINE][key]['mean']):+.1f}"
        lines.append(f"| {name} | " + " | ".join(row) + (f" | {margin} |" if with_margin else " |"))
    return lines


def _size(info: dict) -> str:
    if info.get("dataset", "synth") != "synth":
        return f"the {info['dataset']} dataset (real_data)"
    return f"{info['scenes']['train_images']} training / {info['scenes']['val_images']} validation images"


def _cell(stats: dict, seeds: int) -> str:
    """mean ± half-range; a cell with fewer seeds than the suite says how many (one seed has no spread)."""
    if stats["mean"] is None:
        return "-"
    if stats["seeds"] == 1:
        return f"{stats['mean']:.3f} (1 seed)"
    return f"{stats['mean']:.3f} ± {stats['spread']:.3f}" + (f" ({stats['seeds']} seeds)" if stats["seeds"] < seeds else "")


def to_markdown(report: dict) -> str:
    config = report["config"]
    encoder = config.get("backbone", "small")
    network = ("the small CPU network from scratch" if encoder == "small"
               else f"ImageNet {encoder} with DeepLabV3+ (encoder at a tenth of the rate, BatchNorm frozen)")
    lines = [f"Validation mIoU of {network}, mean ± half-range over seeds {config['seeds']}, "
             f"{config['iterations']} iterations per run unless a family says otherwise (2-core CPU). Best per family in bold; the last column is the "
             "default preset's margin over partial cross-entropy in points.", "",
             "With the dense CRF after the predictor (the presets' evaluation):", ""]
    lines += _table(report, "crf")
    lines += ["", "The predictor alone (no CRF):", ""]
    lines += _table(report, "plain")
    lines += ["", "Families:", ""]
    lines += [f"- **{name}**: {info['note'] or 'as named'}; {_size(info)}; trained on `{info['train_list']}`"
              + (f" for {info['iterations']} iterations." if info["iterations"] != config["iterations"] else ".")
              for name, info in report["families"].items()]
    return "\n".join(lines) + "\n"


def write_plot(report: dict, path: str) -> None:
    """Grouped bars: per family, each objective's mean mIoU with CRF, spread as error bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from .io import atomic_path
    summary = report["summary"]
    families = list(summary)
    objectives = list(next(iter(summary.values())))
    width = 0.8 / len(objectives)
    fig, axis = plt.subplots(figsize=(max(8, 1.3 * len(families)), 4))
    for index, objective in enumerate(objectives):
        means = [summary[f][objective]["crf"]["mean"] or 0 for f in families]
        spreads = [summary[f][objective]["crf"]["spread"] or 0 for f in families]
        axis.bar(np.arange(len(families)) + (index - len(objectives) / 2 + 0.5) * width, means, width,
                 yerr=spreads, label=objective, capsize=2)
    axis.set_xticks(np.arange(len(families)))
    axis.set_xticklabels(families, rotation=25, ha="right", fontsize=7)
    axis.set_ylabel("val mIoU (with CRF)")
    axis.set_ylim(0, 1)
    axis.legend(fontsize=7, ncol=len(objectives))
    fig.tight_layout()
    with atomic_path(path) as temp:
        fig.savefig(temp, dpi=90, format="png")
    plt.close(fig)
