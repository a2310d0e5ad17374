"""``spml-fast experiments``: the README's tables on the built-in data.

Trains and evaluates, on one synthetic dataset:
- each supervision: scribbles, points, boxes (bank from box-fill pseudo-labels), tags
  (relation C and the bank on CAM pseudo-labels from ``spml-fast cam``);
- the scribble ablation: all relations, then without I, without C, without O;
- the partial cross-entropy baseline on the same scribbles.
Writes ``results.json`` and ``results.md`` under ``--out``; finished runs are
reused, so a killed run continues where it stopped.
"""
from __future__ import annotations

import os
from dataclasses import replace
from typing import Optional

from .config import PRESETS, apply_overrides
from .evaluate import run_eval
from .io import save_json, save_text
from .synth import SynthConfig, scene_statistics, write_dataset
from .train import train

SUPERVISIONS = [("scribbles", "synthetic-scribble-spml"), ("points", "synthetic-point"), ("boxes", "synthetic-box"),
                ("tags", "synthetic-tag")]
ABLATIONS = [("all relations (I + C + O)", {}), ("without I", {"relations.weight_image": 0.0}),
             ("without C", {"relations.weight_semantic": 0.0}),
             ("without O", {"relations.weight_cooccurrence": 0.0})]


def _run(name: str, preset: str, overrides: dict, data: str, out: str, iterations: Optional[int]) -> dict:
    config = replace(PRESETS[preset], data_root=data)
    if iterations:
        overrides = dict(overrides, **{"optim.iterations": iterations})
    config = apply_overrides(config, overrides)
    run_dir = os.path.join(out, name)
    train(config, run_dir, resume="auto")      # a finished run is reused
    try:
        result, _ = run_eval(run_dir, progress=False)
        return dict(mIoU=result["mIoU"], per_class=result["per_class"])
    except ValueError as error:          # e.g. tags: no labelled pixels for the bank
        return dict(mIoU=None, note=str(error))


def run_experiments(out: str, iterations: Optional[int] = None, scenes: SynthConfig = SynthConfig()) -> dict:
    """scenes: the built-in data's settings (``--shading 0 --scribble-margin 0``: the flat scenes of the
    README's comparison)."""
    data = os.path.join(out, "data")
    write_dataset(data, scenes)
    if not os.path.exists(os.path.join(data, "train_cam.txt")):     # tags: CAM pseudo-labels (docs/data.md, label maps)
        from .cam import write_cam_labels
        from .synth import CLASSES
        write_cam_labels(data, "train_tag.txt", "train_cam.txt", len(CLASSES))
    results = {"supervision": {}, "ablation": {},
               "scenes": scene_statistics(scenes, PRESETS["synthetic-scribble"].overseg)}
    for label, preset in SUPERVISIONS:
        results["supervision"][label] = _run(preset, preset, {}, data, out, iterations)
    for label, overrides in ABLATIONS:
        name = "synthetic-scribble-spml" if not overrides else "ablation-" + label.replace(" ", "-")
        results["ablation"][label] = _run(name, "synthetic-scribble-spml", overrides, data, out, iterations)
    results["baseline"] = _run("synthetic-scribble-pce", "synthetic-scribble-pce", {}, data, out, iterations)
    save_json(os.path.join(out, "results.json"), results)
    save_text(os.path.join(out, "results.md"), to_markdown(results))
    return results


def _cell(entry: dict) -> str:
    return f"{entry['mIoU']:.3f}" if entry.get("mIoU") is not None else f"- ({entry.get('note', '')})"


def to_markdown(results: dict) -> str:
    lines = ["| supervision (SPML) | val mIoU |", "|---|---|"]
    lines += [f"| {name} | {_cell(entry)} |" for name, entry in results["supervision"].items()]
    lines += ["", "| scribbles: relations | val mIoU |", "|---|---|"]
    lines += [f"| {name} | {_cell(entry)} |" for name, entry in results["ablation"].items()]
    lines += [f"| partial cross-entropy baseline (same network, scribbled pixels only) | "
              f"{_cell(results['baseline'])} |"]
    if "scenes" in results:
        scenes = results["scenes"]
        lines += ["", f"Scribbles label {100 * scenes['labelled_fraction']:.1f}% of the pixels; "
                      f"{100 * scenes['rim_fraction']:.0f}% of the object pixels lie outside the middle the strokes "
                      f"keep to, {100 * scenes['rim_sharing_a_region_with_the_middle']:.0f}% of those in an "
                      "over-segmentation region that reaches the middle."]
    return "\n".join(lines) + "\n"
