"""The trainer on a tiny configuration: exact resume after a kill, the pce objective, the CLI."""
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from spml_fast.config import PRESETS, apply_overrides
from spml_fast.ops.dispatch import use_backend
from spml_fast.synth import SynthConfig, write_dataset
from spml_fast.train import load_checkpoint, train


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tiny"))
    write_dataset(root, SynthConfig(train_images=8, val_images=2, size=40), progress=False)
    return root


@pytest.fixture(autouse=True)
def tiled_pytorch_path():
    """Training in this process takes the tiled PyTorch path: resume, run-folder and interrupt rules do not
    depend on the backend, and the interpreter would multiply their time. The CLI tests (child processes,
    TRITON_INTERPRET inherited) train through the interpreted Triton kernels."""
    with use_backend("torch"):
        yield


def tiny_config(root, preset="synthetic-scribble-hybrid", iterations=6):
    """The hybrid by default: relations with their memory bank and a class head, so that resuming restores
    every kind of training state (the CLI tests train the default preset)."""
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
    assert done.returncode == 2 and "no such run folder or checkpoint" in done.stderr


def test_run_folder_rules(tiny_root, tmp_path):
    """A new run never overwrites one; --resume needs a run and continues it with its own settings."""
    from spml_fast.run import RunError
    config = tiny_config(tiny_root, iterations=2)
    run = str(tmp_path / "run")
    with pytest.raises(RunError, match="nothing to continue"):
        train(config, run, resume=True, progress=False)
    train(config, run, progress=False)
    saved = json.load(open(os.path.join(run, "config.json")))
    assert os.path.isabs(saved["data_root"]) and saved["data_root"] == os.path.abspath(tiny_root)
    before = open(os.path.join(run, "checkpoint.pt"), "rb").read()
    with pytest.raises(RunError, match="already holds a run"):
        train(config, run, progress=False)
    with pytest.raises(RunError, match="optim.lr"):
        train(apply_overrides(config, {"optim.lr": 0.5}), run, resume=True, progress=False)
    with pytest.raises(RunError, match="finished its 2 iterations"):
        train(config, run, resume=True, progress=False)
    assert open(os.path.join(run, "checkpoint.pt"), "rb").read() == before           # nothing was rewritten
    cli = [sys.executable, "-m", "spml_fast", "train"]
    done = subprocess.run(cli + ["--resume", "--out", run, "--batch", "3"], capture_output=True, text=True)
    assert done.returncode == 2 and "optim.batch" in done.stderr
    done = subprocess.run(cli + ["--resume", "--out", run, "--preset", "synthetic-scribble-pce"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "synthetic-scribble-pce" in done.stderr
    assert json.load(open(os.path.join(run, "config.json"))) == saved                   # config.json untouched
    # a run folder opens from any working directory
    done = subprocess.run([sys.executable, "-m", "spml_fast", "eval", "--checkpoint", os.path.abspath(run), "--json"],
                          capture_output=True, text=True, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr


KILL_MID_CHECKPOINT = r"""
import os, signal, sys, torch
sys.path.insert(0, sys.argv[1])
from test_train import tiny_config
import spml_fast.run as run_module
from spml_fast.train import train
torch.set_num_threads(int(sys.argv[4]))          # the parent's count: conv reductions depend on it
original, calls = torch.save, []
def dying_save(state, path):                     # the 2nd checkpoint: half written, then SIGKILL
    calls.append(path)
    if len(calls) == 2:
        with open(path, "wb") as handle:
            handle.write(b"PK\x03\x04 half a zip")
        os.kill(os.getpid(), signal.SIGKILL)
    original(state, path)
run_module.torch.save = dying_save
train(tiny_config(sys.argv[2]), sys.argv[3], progress=False)
"""


def test_sigkill_during_a_checkpoint_write_resumes_bit_exactly(tiny_root, tmp_path):
    tests = os.path.dirname(__file__)
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    train(tiny_config(tiny_root), straight, progress=False)
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}   # the same path
    done = subprocess.run([sys.executable, "-c", KILL_MID_CHECKPOINT, tests, tiny_root, killed,
                           str(torch.get_num_threads())], capture_output=True, text=True, env=env)
    assert done.returncode == -9, done.stderr                    # killed while writing iteration 4's checkpoint
    assert load_checkpoint(os.path.join(killed, "checkpoint.pt"))["iteration"] == 2   # the last good one, intact
    assert any(name.startswith(".tmp-") for name in os.listdir(killed))              # the torn temp file
    with open(os.path.join(killed, "metrics.jsonl"), "a") as log:
        log.write('{"iteration": 4, "lo')                                            # and a torn log line
    train(tiny_config(tiny_root), killed, resume=True, progress=False)
    assert not any(name.startswith(".tmp-") for name in os.listdir(killed))          # cleaned on the next write
    first, second = (load_checkpoint(os.path.join(r, "checkpoint.pt")) for r in (straight, killed))
    assert first["iteration"] == second["iteration"] == 6
    for name, value in first["model"].items():
        assert torch.equal(value, second["model"][name]), name


def test_failed_checkpoint_write_keeps_the_previous(tiny_root, tmp_path, monkeypatch):
    import spml_fast.run as run_module
    from spml_fast.run import RunError, save_checkpoint
    path = str(tmp_path / "checkpoint.pt")
    save_checkpoint(path, {"model": {"w": torch.ones(3)}})
    before = open(path, "rb").read()

    def disk_full(state, target):
        with open(target, "wb") as handle:
            handle.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc] . unexpected pos 64 vs 0")
    monkeypatch.setattr(run_module.torch, "save", disk_full)
    with pytest.raises(RunError, match="previous checkpoint, if any, is intact"):
        save_checkpoint(path, {"model": {"w": torch.zeros(3)}})
    assert open(path, "rb").read() == before
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]


def test_ctrl_c_says_where_the_checkpoint_is(tiny_root, tmp_path, monkeypatch):
    import spml_fast.objective as objective_module
    from spml_fast.train import TrainingInterrupted
    real_step, calls = objective_module.compute, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)
    monkeypatch.setattr(objective_module, "compute", interrupted)
    run = str(tmp_path / "run")
    with pytest.raises(TrainingInterrupted) as caught:
        train(tiny_config(tiny_root), run, progress=False)
    message = str(caught.value)
    assert "iteration 3" in message and "holds iteration 2" in message and f"--resume --out {run}" in message


def test_settings_are_validated_before_training(tiny_root, tmp_path):
    cli = [sys.executable, "-m", "spml_fast", "train", "--preset", "synthetic-scribble", "--data", tiny_root,
           "--out", str(tmp_path / "run"), "--workers", "0"]
    for flags, expected in ((["--batch", "0"], "--batch"), (["--iterations", "0"], "--iterations"),
                            (["--crop", "0"], "--crop"), (["--classes", "4"], "classes.txt names 6"),
                            (["--config", str(tmp_path / "nofile.yaml")], "nofile.yaml")):
        done = subprocess.run(cli + flags, capture_output=True, text=True)
        assert done.returncode == 2 and expected in done.stderr, (flags, done.stderr)
        assert "Traceback" not in done.stderr
    assert not os.path.exists(tmp_path / "run" / "checkpoint.pt")


def test_a_bad_file_found_by_a_worker_is_one_clear_line(tiny_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_root, root)
    for image in (root / "JPEGImages").iterdir():              # the first batch a worker loads is bad
        image.write_bytes(b"not a png")
    done = subprocess.run([sys.executable, "-m", "spml_fast", "train", "--preset", "synthetic-scribble", "--data",
                           str(root), "--out", str(tmp_path / "run"), "--workers", "1", "--iterations", "2",
                           "--batch", "2", "--crop", "40", "--set", "model.width=8"], capture_output=True, text=True)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "error: cannot read image" in errors[0] and "JPEGImages" in errors[0]
    assert "Traceback" not in done.stderr
