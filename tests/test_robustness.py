"""Scene families of the built-in generator and the robustness suite's
machinery (a tiny suite: every cell trained, evaluated with and without the
CRF, summarised, plotted, and reused when run again)."""
import colorsys
import json
import os

import numpy as np
import torch
from scipy import ndimage

from spml_fast.robustness import FAMILIES, QUICK, Family, SuiteConfig, run_suite, to_markdown, write_report
from spml_fast.synth import SynthConfig, make_scene


def object_hues(config: SynthConfig, scenes: int = 30) -> dict:
    """class -> mean hue of each of its (unoccluded-enough) objects."""
    hues = {}
    for seed in range(scenes):
        scene = make_scene(seed, config)
        for cls in scene["tags"]:
            components, count = ndimage.label(scene["mask"] == cls)
            for part in range(1, count + 1):
                pixels = scene["image"][components == part]
                if len(pixels) >= 60:
                    r, g, b = pixels.mean(0) / 255.0
                    hues.setdefault(cls, []).append(colorsys.rgb_to_hsv(r, g, b)[0])
    return hues


def circular_spread(values) -> float:
    angles = np.asarray(values) * 2 * np.pi
    return 1.0 - float(np.hypot(np.cos(angles).mean(), np.sin(angles).mean()))


def test_cues_decide_what_tells_classes_apart():
    colour = object_hues(SynthConfig(cue="colour", shading=0.0))
    texture = object_hues(SynthConfig(cue="texture", shading=0.0))
    for cls in (1, 2, 3):       # a class's hue: fixed when colour is the cue, random when texture is
        assert circular_spread(colour[cls]) < 0.05
        assert circular_spread(texture[cls]) > 0.2


def test_straight_lines_one_per_class():
    config = SynthConfig(cue="texture+shape", classes=3, stroke="line", scribble_per_class=True, scribble_margin=0.0)
    for seed in range(10):
        scene = make_scene(seed, config)
        for cls in [0] + scene["tags"]:
            stroke = np.argwhere(scene["scribble"] == cls)
            eight = np.ones((3, 3), dtype=bool)                                        # 1-px diagonals
            assert len(stroke) > 0 and ndimage.label(scene["scribble"] == cls, eight)[1] == 1   # one stroke
            if len(stroke) >= 3:                                                       # straight: rank-1 spread
                centred = stroke - stroke.mean(0)
                singular = np.linalg.svd(centred.astype(float), compute_uv=False)
                assert singular[1] <= 0.05 * singular[0] + 1.0


def test_suite_runs_reports_and_reuses_its_cells(tmp_path):
    config = SuiteConfig(iterations=3, seeds=(0, 1), jobs=1, families=("built-in", "points"),
                         objectives=("pce", "tel"), scale=0.06)
    threads = torch.get_num_threads()
    report = run_suite(str(tmp_path), config, progress=False)
    assert torch.get_num_threads() == threads             # in-process jobs leave the caller's thread count alone
    assert len(report["runs"]) == 8 and set(report["summary"]) == {"built-in", "points"}
    cell = report["summary"]["points"]["tel"]
    assert cell["crf"]["seeds"] == 2 and 0.0 <= cell["crf"]["mean"] <= 1.0 and cell["plain"]["spread"] >= 0.0
    markdown = open(tmp_path / "results.md").read()
    assert markdown == to_markdown(report) and "| points |" in markdown and "With the dense CRF" in markdown
    assert os.path.getsize(tmp_path / "robustness.png") > 1000
    results = sorted(str(p) for p in tmp_path.glob("runs/*/*/result.json"))
    stamps = [os.path.getmtime(p) for p in results]
    again = run_suite(str(tmp_path), config, progress=False)             # finished cells are reused
    assert [os.path.getmtime(p) for p in results] == stamps
    assert json.dumps(again["summary"], sort_keys=True) == json.dumps(report["summary"], sort_keys=True)
    os.remove(results[0])                                                # a report on part of a suite
    partial = write_report(str(tmp_path), config)
    assert sum(cell["crf"]["seeds"] for cells in partial["summary"].values() for cell in cells.values()) == 7


def test_families_cover_the_axes_the_suite_must_vary():
    scenes = [family.scenes for family in FAMILIES.values()]
    assert {s.cue for s in scenes} >= {"colour", "texture", "shape", "texture+shape"}
    assert {s.train_images for s in scenes} >= {60, 160, 500}
    assert {family.train_list for family in FAMILIES.values()} >= {"train_scribble.txt", "train_point.txt",
                                                                  "train_boxfill.txt"}
    assert any(s.clutter for s in scenes) and {s.stroke for s in scenes} == {"walk", "line"}
    assert {s.scribble_width for s in scenes} >= {0, 1} and {s.scribble_margin for s in scenes} >= {0.0, 0.35}


def test_a_family_budget_multiplies_the_suite_iterations(tmp_path, monkeypatch):
    monkeypatch.setitem(FAMILIES, "long", Family(SynthConfig(), budget=2, note="trained longer"))
    config = SuiteConfig(iterations=2, seeds=(0,), jobs=1, families=("built-in", "long"), objectives=("pce",),
                         scale=0.06)
    report = run_suite(str(tmp_path), config, progress=False)
    trained = {name: json.load(open(tmp_path / "runs" / name / "pce-s0" / "config.json"))["optim"]["iterations"]
               for name in ("built-in", "long")}
    assert trained == {"built-in": 2, "long": 4}
    assert report["families"]["long"]["iterations"] == 4
    markdown = to_markdown(report)
    assert "trained longer; " in markdown and "for 4 iterations." in markdown
    assert "`train_scribble.txt` for" not in markdown.split("**built-in**")[1].split("\n")[0]
    assert all(FAMILIES[name].budget == 1 for name in QUICK.families)      # --quick keeps to the short budget
