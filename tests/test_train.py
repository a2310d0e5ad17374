"""The trainer on a tiny configuration: exact resume after a kill, the pce objective, the CLI."""
import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from spml_fast.config import PRESETS, apply_overrides
from spml_fast.synth import SynthConfig, write_dataset
from spml_fast.train import load_checkpoint, train


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tiny"))
    write_dataset(root, SynthConfig(train_images=8, val_images=2, size=40), progress=False)
    return root


def tiny_config(root, preset="synthetic-scribble", iterations=6):
    config = replace(PRESETS[preset], data_root=root)
    return apply_overrides(config, {"optim.iterations": iterations, "optim.batch": 2, "optim.warmup": 2,
                                    "augment.crop": 40, "workers": 0, "checkpoint_every": 2,
                                    "model.width": 8, "model.embedding_dim": 8, "kmeans_grid": 2,
                                    "kmeans_iterations": 3, "relations.weight_affinity": 0.5})


def test_killed_run_resumes_to_the_same_weights(tiny_root, tmp_path):
    config = tiny_config(tiny_root)
    train(config, str(tmp_path / "straight"), progress=False)
    # "killed" after iteration 3: the last checkpoint is from iteration 2, iteration 3 is lost
    partial = train(config, str(tmp_path / "resumed"), stop_after=3, progress=False)
    assert partial["checkpoint"] is None
    assert load_checkpoint(str(tmp_path / "resumed" / "checkpoint.pt"))["iteration"] == 2
    train(config, str(tmp_path / "resumed"), resume=True, progress=False)
    straight = load_checkpoint(str(tmp_path / "straight" / "checkpoint.pt"))
    resumed = load_checkpoint(str(tmp_path / "resumed" / "checkpoint.pt"))
    assert straight["iteration"] == resumed["iteration"] == 6
    for name, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][name]), name
    lines = [json.loads(l) for l in open(tmp_path / "resumed" / "metrics.jsonl")]
    assert [l["iteration"] for l in lines] == sorted({l["iteration"] for l in lines})   # no duplicates
    assert not any(name.startswith(".tmp-") for name in os.listdir(tmp_path / "resumed"))


def test_pce_objective_trains(tiny_root, tmp_path):
    result = train(tiny_config(tiny_root, "synthetic-scribble-pce", iterations=3), str(tmp_path / "pce"),
                   progress=False)
    assert set(result["losses"]) == {"partial_ce", "total"} and result["losses"]["partial_ce"] > 0


def test_cli_train_and_eval_json(tiny_root, tmp_path):
    run = tmp_path / "cli"
    command = [sys.executable, "-m", "spml_fast", "train", "--preset", "synthetic-scribble", "--data", tiny_root,
               "--out", str(run), "--iterations", "2", "--batch", "2", "--crop", "40", "--workers", "0",
               "--set", "model.width=8", "--set", "kmeans_grid=2"]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    done = subprocess.run([sys.executable, "-m", "spml_fast", "eval", "--checkpoint", str(run), "--data", tiny_root,
                           "--list", "val.txt", "--json"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert 0.0 <= result["mIoU"] <= 1.0 and len(result["per_class"]) == 6
    # a list naming a missing image: an error naming the file, or skipped with --skip-bad
    bad_list = tmp_path / "bad.txt"
    bad_list.write_text("JPEGImages/missing.png segcls/missing.png\nJPEGImages/0008.png segcls/0008.png\n")
    command = [sys.executable, "-m", "spml_fast", "eval", "--checkpoint", str(run), "--data", tiny_root,
               "--list", str(bad_list), "--json"]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 2 and "missing.png" in done.stderr
    done = subprocess.run(command + ["--skip-bad"], capture_output=True, text=True)
    assert done.returncode == 0 and "skipping" in done.stderr and "missing.png" in done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["pixels"] == 40 * 40


def test_cli_errors_name_the_problem(tiny_root, tmp_path):
    done = subprocess.run([sys.executable, "-m", "spml_fast", "train", "--preset", "synthetic-scribble",
                           "--data", tiny_root, "--set", "optim.nope=1"], capture_output=True, text=True)
    assert done.returncode == 2 and "unknown setting 'optim.nope'" in done.stderr
    done = subprocess.run([sys.executable, "-m", "spml_fast", "eval", "--checkpoint", str(tmp_path / "none")],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "no checkpoint" in done.stderr
