"""The fault-injection audit of the commands, one test per finding (numbered as in the audit), and the
new-user frictions found with it. Each test failed before its fix."""
import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from spml_fast.cli import main
from spml_fast.config import PRESETS, apply_overrides
from spml_fast.ops.dispatch import use_backend
from spml_fast.run import Run, RunError
from spml_fast.synth import SynthConfig, write_dataset
from spml_fast.train import train


def cli(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def small(config, root, **changes):
    return apply_overrides(dataclasses.replace(config, data_root=root), dict({
        "optim.iterations": 4, "optim.batch": 2, "optim.warmup": 1, "augment.crop": 40, "workers": 0,
        "checkpoint_every": 2, "model.width": 8, "model.embedding_dim": 8, "kmeans_grid": 2, "bank_grid": 3}, **changes))


@pytest.fixture(autouse=True)
def tiled_pytorch_path():
    with use_backend("torch"):
        yield


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("audit") / "data")
    write_dataset(root, SynthConfig(train_images=6, val_images=2, size=40), progress=False)
    return root


@pytest.fixture(scope="module")
def head_run(data, tmp_path_factory):
    """A run of the default preset (a class head) and a bank built from it: (run folder, bank path)."""
    from spml_fast.bank import build_run_bank, save_bank
    folder = str(tmp_path_factory.mktemp("head") / "run")
    with use_backend("torch"):
        train(small(PRESETS["synthetic-scribble"], data), folder, progress=False)
    bank = os.path.join(os.path.dirname(folder), "bank.safetensors")
    save_bank(build_run_bank(folder, progress=False), bank)
    return folder, bank


def test_1_outputs_never_overwrite_a_run_or_the_bank_sidecar(head_run, tmp_path, capsys):
    run, _ = head_run
    checkpoint = open(os.path.join(run, "checkpoint.pt"), "rb").read()
    for command in (["bank", "--checkpoint", run, "--out", os.path.join(run, "checkpoint.pt")],
                    ["train-classifier", "--checkpoint", run, "--out", os.path.join(run, "checkpoint.pt")],
                    ["bank", "--checkpoint", run, "--out", os.path.join(run, "config.json")],
                    ["export", "--checkpoint", run, "--out", os.path.join(run, "metrics.jsonl")]):
        code, _, err = cli(capsys, *command)
        assert code == 2 and "the run's own" in err, (command, err)
    code, out, err = cli(capsys, "bank", "--checkpoint", run, "--out", tmp_path / "b.json")
    assert code == 2 and "the same file" in err and not (tmp_path / "b.json").exists()
    assert open(os.path.join(run, "checkpoint.pt"), "rb").read() == checkpoint
    assert cli(capsys, "eval", "--checkpoint", run, "--json", "--crf", "off")[0] == 0


def test_2_a_head_run_predicts_with_its_head_unless_told(head_run, tmp_path, capsys):
    run, bank = head_run
    for command in (["export", "--checkpoint", run, "--bank", bank, "--out", tmp_path / "m.onnx"],
                    ["predict", os.path.join(Run.open(run).config.data_root, "JPEGImages"), "--checkpoint", run,
                     "--bank", bank, "--out", tmp_path / "p"],
                    ["eval", "--checkpoint", run, "--bank", bank]):
        code, _, err = cli(capsys, *command)
        assert code == 2 and "--method pixel-knn" in err, (command, err)
    assert not (tmp_path / "p").exists() and not (tmp_path / "m.onnx").exists()
    code, out, err = cli(capsys, "eval", "--checkpoint", run, "--bank", bank, "--method", "pixel-knn", "--json",
                         "--crf", "off")
    assert code == 0, err
    assert json.loads(out.splitlines()[-1])["method"] == "pixel-knn"
    from spml_fast.predictor import open_predictor
    assert open_predictor(run).method == "classifier"


def test_3_a_second_train_into_a_locked_folder_is_refused(data, tmp_path):
    from spml_fast.run import run_lock
    folder = str(tmp_path / "run")
    with run_lock(folder):
        with pytest.raises(RunError, match="is training into this run folder"):
            train(small(PRESETS["synthetic-scribble-pce"], data), folder, progress=False)
    assert not os.path.exists(os.path.join(folder, "config.json"))
    train(small(PRESETS["synthetic-scribble-pce"], data, **{"optim.iterations": 1}), folder, progress=False)


def test_4_non_finite_settings_are_refused_and_a_diverging_run_stops(data, tmp_path, monkeypatch):
    for key, value in (("objective.tree_energy", "nan"), ("objective.partial_ce", "inf"), ("optim.lr", "nan")):
        with pytest.raises(ValueError, match=key.split(".")[-1]):
            apply_overrides(PRESETS["synthetic-scribble"], {key: value})
    import spml_fast.objective as objective_module
    real, calls = objective_module.compute, []

    def diverging(*args, **kwargs):
        total, terms, local = real(*args, **kwargs)
        calls.append(1)
        return (total * float("nan") if len(calls) == 3 else total), terms, local
    monkeypatch.setattr(objective_module, "compute", diverging)
    folder = str(tmp_path / "run")
    with pytest.raises(RunError, match="not finite at iteration 3"):
        train(small(PRESETS["synthetic-scribble-pce"], data), folder, progress=False)
    state = torch.load(os.path.join(folder, "checkpoint.pt"), weights_only=True)
    assert state["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_5_crf_on_keeps_the_run_s_crf_parameters(head_run):
    from spml_fast.predictor import run_settings
    run = Run.open(head_run[0])
    tuned = run.with_settings(crf=dataclasses.replace(run.config.crf, enabled=False, position_weight=5.0,
                                                      iterations=2))
    settings = run_settings(tuned, crf=True)
    assert settings.crf == dataclasses.replace(tuned.config.crf, enabled=True)
    assert settings.k == tuned.config.eval_k and settings.method == "classifier"
    assert run_settings(tuned, k=3).crf == tuned.config.crf                      # --k changes only k


def test_6_sixteen_bit_images_are_scaled_and_out_of_range_labels_refused(tmp_path):
    from spml_fast.data import DataError, load_image, load_label
    grey = np.array([[0, 32768], [65535, 257]], dtype=np.uint16)
    Image.fromarray(grey).save(tmp_path / "image.png")
    assert Image.open(tmp_path / "image.png").mode.startswith("I")
    assert load_image(str(tmp_path / "image.png"))[..., 0].tolist() == [[0, 128], [255, 1]]
    Image.fromarray(np.array([[0, 300], [1, 255]], dtype=np.uint16)).save(tmp_path / "label.png")
    with pytest.raises(DataError, match="holds value 300"):
        load_label(str(tmp_path / "label.png"), 21)


def test_7_a_bank_input_of_another_checkpoint_is_refused(deploy_run, tmp_path, capsys):
    from spml_fast.bank import load_bank, save_bank
    _, run, bank = deploy_run
    model = tmp_path / "m.onnx"
    code, _, err = cli(capsys, "export", "--checkpoint", run, "--bank", bank, "--bank-as-input", "--out", model)
    assert code == 0, err
    other = load_bank(bank)
    save_bank(dataclasses.replace(other, metadata=dict(other.metadata, checkpoint_sha256="0" * 64)),
              str(tmp_path / "other.safetensors"))
    image = os.path.join(Run.open(run).config.data_root, "JPEGImages")
    code, _, err = cli(capsys, "predict", image, "--model", model, "--bank", tmp_path / "other.safetensors",
                       "--out", tmp_path / "p")
    assert code == 2 and "another checkpoint" in err
    assert cli(capsys, "predict", image, "--model", model, "--bank", bank, "--out", tmp_path / "p")[0] == 0


def test_8_label_values_are_checked_before_the_first_step(data, tmp_path, monkeypatch):
    from spml_fast.data import DataError
    import spml_fast.objective as objective_module
    root = str(tmp_path / "data")
    shutil.copytree(data, root)
    last = open(os.path.join(root, "train_scribble.txt")).read().split()[-1]
    label = np.array(Image.open(os.path.join(root, last)))
    label[0, 0] = 9                                             # 6 classes
    Image.fromarray(label).save(os.path.join(root, last))
    steps = []
    monkeypatch.setattr(objective_module, "compute", lambda *a, **k: steps.append(1))
    with pytest.raises(DataError, match="holds value 9"):
        train(small(PRESETS["synthetic-scribble-pce"], root, **{"optim.batch": 1}), str(tmp_path / "r"),
              progress=False)
    assert steps == []


def test_9_a_list_without_labelled_pixels_is_an_error(data, tmp_path):
    from spml_fast.data import DataError
    images = [line.split()[0] for line in open(os.path.join(data, "train_scribble.txt"))]
    with open(os.path.join(data, "images_only.txt"), "w") as handle:
        handle.write("\n".join(images) + "\n")
    with pytest.raises(DataError, match="no labelled pixel"):
        train(small(PRESETS["synthetic-scribble-pce"], data, train_list="images_only.txt"), str(tmp_path / "r"),
              progress=False)


def test_10_no_run_file_is_ever_overwritten(data, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.json").write_text('{"mine": 1}')
    (folder / "metrics.jsonl").write_text('{"iteration": 1}\n')
    with pytest.raises(RunError, match="already holds a run"):
        train(small(PRESETS["synthetic-scribble-pce"], data), str(folder), progress=False)
    assert (folder / "config.json").read_text() == '{"mine": 1}'
    assert (folder / "metrics.jsonl").read_text() == '{"iteration": 1}\n'


def test_11_12_triton_names_and_batch_sizes_are_validated():
    from spml_fast.export.triton_repo import ServingConfig, check_model_name
    for name in ("evil\n", "a/b", "..", ""):
        with pytest.raises(ValueError, match="--name"):
            check_model_name(name)
    for size in (-5, 0):
        with pytest.raises(ValueError, match="--max-batch"):
            ServingConfig(max_batch_size=size)


def test_13_16_settings_of_the_wrong_type_are_one_line_errors(head_run, tmp_path, capsys, data):
    import yaml
    for overrides, key in (({"objective": {"tree_energy": [1]}}, "objective.tree_energy"),
                           ({"objective": [1, 2]}, "objective"), ({"optim": {"iterations": 30.5}}, "iterations"),
                           ({"crf": {"enabled": "no"}}, "crf.enabled")):
        path = tmp_path / "overrides.yaml"
        path.write_text(yaml.safe_dump(overrides))
        code, _, err = cli(capsys, "train", "--preset", "synthetic-scribble", "--data", data, "--config", path,
                           "--out", tmp_path / "r")
        assert code == 2 and key in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    run = tmp_path / "copy"
    shutil.copytree(head_run[0], run)
    saved = json.load(open(run / "config.json"))
    for key, value in (("eval_k", "ten"), ("iterations", 30.5), ("crf", {"enabled": "no"})):
        edited = dict(saved)
        if key == "iterations":
            edited["optim"] = dict(saved["optim"], iterations=value)
        else:
            edited[key] = value
        (run / "config.json").write_text(json.dumps(edited))
        code, _, err = cli(capsys, "export", "--checkpoint", run, "--out", tmp_path / "m.onnx")
        assert code == 2 and "config.json" in err and key.split(".")[-1] in err, err


def test_14_bank_options_that_would_be_ignored_are_errors(head_run, tmp_path, capsys):
    run, bank = head_run
    code, _, err = cli(capsys, "bank", "--checkpoint", run, "--add", "", "--bank", bank, "--list", "val.txt",
                       "--out", tmp_path / "c.safetensors")
    assert code == 2 and "needs a name" in err
    code, _, err = cli(capsys, "bank", "--checkpoint", run, "--bank", bank, "--out", tmp_path / "c.safetensors")
    assert code == 2 and "only read with --add" in err


def test_15_options_the_method_ignores_are_refused_before_outputs(head_run, tmp_path, capsys):
    run, bank = head_run
    image = os.path.join(Run.open(run).config.data_root, "JPEGImages")
    code, _, err = cli(capsys, "predict", image, "--checkpoint", run, "--bank", bank, "--method", "classifier",
                       "--out", tmp_path / "p")
    assert code == 2 and "--bank" in err and not (tmp_path / "p").exists()
    (tmp_path / "torn.safetensors").write_bytes(b"\x00" * 10)
    code, _, err = cli(capsys, "eval", "--checkpoint", run, "--bank", tmp_path / "torn.safetensors")
    assert code == 2


def test_17_a_class_added_from_images_already_in_the_bank_is_refused(head_run, tmp_path, capsys):
    run, bank = head_run
    root = Run.open(run).config.data_root
    masks = []
    for line in open(os.path.join(root, "train_scribble.txt")):
        image, label = line.split()[:2]
        scribble = np.array(Image.open(os.path.join(root, label)))
        mask = np.where(scribble == 0, 0, np.where(scribble == 255, 255, 1)).astype(np.uint8)
        mask_path = os.path.join("masks", os.path.basename(label))
        os.makedirs(os.path.join(root, "masks"), exist_ok=True)
        Image.fromarray(mask).save(os.path.join(root, mask_path))
        masks.append(f"{image} {mask_path}")
    with open(os.path.join(root, "horse.txt"), "w") as handle:
        handle.write("\n".join(masks) + "\n")
    code, _, err = cli(capsys, "bank", "--checkpoint", run, "--add", "horse", "--bank", bank, "--list", "horse.txt",
                       "--out", tmp_path / "c.safetensors")
    assert code == 2 and "already in the bank" in err


def test_18_a_finished_run_says_so_and_can_be_extended(data, tmp_path, capsys):
    folder = tmp_path / "run"
    train(small(PRESETS["synthetic-scribble-pce"], data, **{"optim.iterations": 2}), str(folder), progress=False)
    code, _, err = cli(capsys, "train", "--resume", "--out", folder)
    assert code == 2 and "finished its 2 iterations" in err
    code, out, err = cli(capsys, "train", "--resume", "--out", folder, "--iterations", "3", "--no-eval")
    assert code == 0 and "trained 3 iterations" in out, err
    assert torch.load(folder / "checkpoint.pt", weights_only=True)["iteration"] == 3


def test_own_data_recipe_as_documented_on_hand_made_data(tmp_path, capsys, monkeypatch):
    """docs/data.md's layout and recipe, run as written on images drawn here (not by the generator)."""
    import re
    root = tmp_path / "your_data"
    for folder in ("JPEGImages", "scribble", "segcls"):
        (root / folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    train_lines, val_lines = [], []
    for index in range(6):
        image = np.full((40, 40, 3), (30, 30, 30), dtype=np.uint8)
        mask = np.zeros((40, 40), dtype=np.uint8)
        top, left = rng.integers(2, 20, size=2)
        image[top:top + 15, left:left + 15] = (200, 60, 40)
        mask[top:top + 15, left:left + 15] = 1
        scribble = np.full((40, 40), 255, dtype=np.uint8)
        scribble[top + 7, left + 2:left + 13] = 1
        scribble[2, 2:38] = 0
        Image.fromarray(image).save(root / "JPEGImages" / f"{index}.jpg")
        Image.fromarray(scribble).save(root / "scribble" / f"{index}.png")
        Image.fromarray(mask).save(root / "segcls" / f"{index}.png")
        train_lines.append(f"JPEGImages/{index}.jpg scribble/{index}.png")
        val_lines.append(f"JPEGImages/{index}.jpg segcls/{index}.png")
    (root / "classes.txt").write_text("background\nsquare\n")
    (root / "train.txt").write_text("\n".join(train_lines) + "\n")
    (root / "val.txt").write_text("\n".join(val_lines[:2]) + "\n")
    docs = open(os.path.join(os.path.dirname(__file__), "..", "docs", "data.md")).read()
    recipe = re.search(r"```\n(spml-fast train .*?)```", docs, re.S).group(1)
    commands = [line.split("[")[0].replace("\\", "").split() for line in recipe.replace("\\\n", " ").splitlines()
                if line.strip()]
    (tmp_path / "new_images").mkdir()
    shutil.copy(root / "JPEGImages" / "0.jpg", tmp_path / "new_images" / "a.jpg")
    monkeypatch.chdir(tmp_path)
    quick = ["--iterations", "3", "--crop", "40", "--batch", "2", "--workers", "0", "--set", "model.width=8"]
    for command in commands:
        assert command[0] == "spml-fast"
        code, out, err = cli(capsys, *command[1:], *(quick if command[1] == "train" else []))
        assert code == 0, (command, err)
    assert os.path.isfile(tmp_path / "runs" / "mine" / "checkpoint.pt")
    assert os.path.isfile(tmp_path / "predictions" / "a.png")
