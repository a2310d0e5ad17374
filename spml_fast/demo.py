"""``spml-fast demo``: the main job on the built-in data. Writes the synthetic
dataset, trains the default scribble preset (``synthetic-scribble``, the
objective that won the robustness suite) and the partial cross-entropy
baseline on the same scribbles (``synthetic-scribble-pce``),
evaluates both on the validation split, and saves a figure
(image / scribbles / prediction / ground truth)."""
from __future__ import annotations

import os
from dataclasses import replace
from typing import Optional

import numpy as np
import torch

from .config import PRESETS, apply_overrides
from .evaluate import format_table, run_eval
from .predictor import open_predictor
from .io import save_json
from .objective import describe
from .overlay import palette
from .synth import SynthConfig, write_dataset
from .train import train


def demo(out: str, iterations: Optional[int] = None, scenes: SynthConfig = SynthConfig()) -> dict:
    """scenes: the built-in data's settings (``spml-fast demo --shading 0 --scribble-margin 0``: flat scenes
    with strokes anywhere inside the objects)."""
    data = os.path.join(out, "data")
    write_dataset(data, scenes)
    results, loaded = {}, {}
    for preset in ("synthetic-scribble", "synthetic-scribble-pce"):
        config = replace(PRESETS[preset], data_root=data)
        if iterations:
            config = apply_overrides(config, {"optim.iterations": iterations})
        run_dir = os.path.join(out, preset)
        train(config, run_dir, resume="auto")
        loaded[preset] = open_predictor(run_dir, build_bank=True)
        result, class_names = run_eval(run_dir, predictor=loaded[preset])
        results[preset] = result
        print(f"\n{preset}: val mIoU {result['mIoU']:.3f}\n{format_table(result, class_names)}\n")
    figure = os.path.join(out, "demo.png")
    save_figure(loaded["synthetic-scribble"], data, figure)
    default, pce = results["synthetic-scribble"]["mIoU"], results["synthetic-scribble-pce"]["mIoU"]
    print(f"val mIoU: the default scribble preset ({describe(PRESETS['synthetic-scribble'].objective)}) "
          f"{default:.3f}, partial cross-entropy on the same scribbles {pce:.3f} "
          f"({100 * (default - pce):+.1f} points). Figure: {figure}")
    save_json(os.path.join(out, "results.json"), {k: v for k, v in results.items()})
    return results


@torch.no_grad()
def save_figure(predictor, data: str, path: str, count: int = 4) -> None:
    """predictor: a run's ``Predictor``; the first ``count`` validation images under ``data``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image
    val_set = predictor.run.dataset(data_root=data)
    val_entries = val_set.entries[:count]
    colours = np.array(palette()[:3 * 256]).reshape(256, 3).astype(np.uint8)
    fig, axes = plt.subplots(count, 4, figsize=(8, 2 * count))
    for row, entry in enumerate(val_entries):
        sample = val_set[row]
        prediction = predictor.scores(sample["image"][None])[0].argmax(0).numpy()
        scribble_path = entry.image.replace("JPEGImages", "scribble")
        panels = [np.asarray(Image.open(entry.image).convert("RGB")),
                  colours[np.asarray(Image.open(scribble_path))] if os.path.exists(scribble_path) else None,
                  colours[prediction], colours[sample["label"].numpy()]]
        for col, (panel, title) in enumerate(zip(panels, ["image", "scribbles (train-style)", "prediction",
                                                          "ground truth"])):
            axes[row, col].axis("off")
            if panel is not None:
                axes[row, col].imshow(panel)
            if row == 0:
                axes[row, col].set_title(title, fontsize=8)
    fig.tight_layout()
    from .io import atomic_path
    with atomic_path(path) as temp:
        fig.savefig(temp, dpi=80, format="png")
    plt.close(fig)
