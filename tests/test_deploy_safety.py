"""What the audit of the deployment chain found, each as a test: the run's own
k and CRF everywhere, banks from another checkpoint or with NaN rows refused,
exports that never destroy the previous model, Triton names and class names
that cannot escape, predict's output names, clean errors for bad files."""
import dataclasses
import json
import os
import shutil

import numpy as np
import pytest

from spml_fast.cli import build_parser, main


def run_cli(capsys, *args):
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def deployable(deploy_run):
    from spml_fast.predictor import open_predictor
    _, run, bank = deploy_run
    return open_predictor(run, bank)


def test_every_command_takes_k_and_crf_from_the_run(deploy_run, deployable, tmp_path, capsys):
    from spml_fast.export.onnx_export import read_metadata
    from spml_fast.predictor import run_settings
    from spml_fast.run import Run
    data, run, bank = deploy_run
    opened = Run.open(run)
    assert opened.config.eval_k == 10 and deployable.k == 10 and run_settings(opened).k == 10
    model = str(tmp_path / "m.onnx")
    code, out, err = run_cli(capsys, "export", "--checkpoint", run, "--bank", bank, "--out", model)
    assert code == 0, err
    metadata = read_metadata(model)
    assert metadata["k"] == 10 and metadata["crf"]["enabled"] is True and "k = 10" in out


def test_banks_of_another_checkpoint_or_with_nan_rows_are_refused(deploy_run, tmp_path, capsys):
    from spml_fast.bank import load_bank, save_bank
    from spml_fast.run import Run, RunError
    data, run, bank_path = deploy_run
    bank = load_bank(bank_path)
    other = dataclasses.replace(bank, metadata=dict(bank.metadata, checkpoint_sha256="0" * 64))
    save_bank(other, str(tmp_path / "other.safetensors"))
    with pytest.raises(RunError, match="another checkpoint"):
        load_bank(str(tmp_path / "other.safetensors"), run=Run.open(run))
    for command in (["eval", "--checkpoint", run], ["export", "--checkpoint", run, "--out", str(tmp_path / "x.onnx")]):
        code, _, err = run_cli(capsys, *command, "--bank", str(tmp_path / "other.safetensors"))
        assert code == 2 and "another checkpoint" in err
    prototypes = bank.prototypes.clone()
    prototypes[3] = float("nan")
    save_bank(dataclasses.replace(bank, prototypes=prototypes), str(tmp_path / "nan.safetensors"))
    with pytest.raises(ValueError, match="1 of .* prototypes hold NaN"):
        load_bank(str(tmp_path / "nan.safetensors"))


def test_a_failed_export_leaves_the_previous_model(deployable, tmp_path, monkeypatch):
    from spml_fast.export import pipeline
    from spml_fast.export.onnx_export import ExportConfig
    from spml_fast.export.parity import ParityError
    model = str(tmp_path / "model.onnx")
    pipeline.export_run(deployable, "onnx", model, ExportConfig(k=3))
    before = {name: open(tmp_path / name, "rb").read() for name in ("model.onnx", "model.parity.json")}

    def failing(*args, **kwargs):
        raise ParityError("onnxruntime disagrees with PyTorch")
    monkeypatch.setattr(pipeline.parity_check, "check_parity", failing)
    with pytest.raises(ParityError):
        pipeline.export_run(deployable, "onnx", model, ExportConfig(k=5))
    assert {name: open(tmp_path / name, "rb").read() for name in before} == before
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]
    repo = str(tmp_path / "repo")
    monkeypatch.undo()
    pipeline.export_run(deployable, "triton-repo", repo, ExportConfig(k=3))
    config_before = open(os.path.join(repo, "spml_segmenter", "config.pbtxt")).read()
    monkeypatch.setattr(pipeline.parity_check, "check_parity", failing)
    with pytest.raises(ParityError):
        pipeline.export_run(deployable, "triton-repo", repo, ExportConfig(k=5))
    assert open(os.path.join(repo, "spml_segmenter", "config.pbtxt")).read() == config_before


def test_triton_names_stay_in_the_repository_and_class_names_are_escaped(deployable, tmp_path):
    pytest.importorskip("tritonclient.grpc", reason="tritonclient not installed")
    from spml_fast.export.onnx_export import ExportConfig
    from spml_fast.export.pipeline import export_run
    from spml_fast.export.triton_repo import ServingConfig, parse_config
    for name in ("../../x", "a/b", "..", ""):
        with pytest.raises(ValueError, match="--name"):
            export_run(deployable, "triton-repo", str(tmp_path / "repo"), ExportConfig(k=3), ServingConfig(name=name))
    assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "repo")
    crafted = '"} } backend: "python" parameters { key: "EXECUTION_ENV_PATH" value { string_value: "/tmp/x'
    names = list(deployable.class_names)
    names[1] = crafted
    export_run(dataclasses.replace(deployable, class_names=names), "triton-repo", str(tmp_path / "repo"),
               ExportConfig(k=3))
    parsed = parse_config(str(tmp_path / "repo" / "spml_segmenter" / "config.pbtxt"))
    assert parsed.backend == "" and set(parsed.parameters) == {"class_names"}
    assert json.loads(parsed.parameters["class_names"].string_value) == names


def test_predict_refuses_colliding_outputs_and_options_a_model_ignores(deploy_run, tmp_path, capsys):
    data, run, bank = deploy_run
    image = os.path.join(data, "JPEGImages", "0000.png")
    for folder in ("a", "b"):
        os.makedirs(tmp_path / folder)
        shutil.copy(image, tmp_path / folder / "x.png")
    shutil.copy(image, tmp_path / "a" / "x.jpg")
    shutil.copy(image, tmp_path / "y.png")
    shutil.copy(image, tmp_path / "y_overlay.png")
    out = str(tmp_path / "out")
    for inputs in ([tmp_path / "a" / "x.png", tmp_path / "b" / "x.png"], [tmp_path / "a" / "x.png", tmp_path / "a" / "x.jpg"],
                   [tmp_path / "y.png", tmp_path / "y_overlay.png"]):
        code, _, err = run_cli(capsys, "predict", "--checkpoint", run, "--bank", bank, *map(str, inputs), "--out", out)
        assert code == 2 and "would both write" in err
    assert not os.path.exists(out)
    model = str(tmp_path / "m.onnx")
    assert run_cli(capsys, "export", "--checkpoint", run, "--bank", bank, "--out", model)[0] == 0
    for extra in (["--k", "5"], ["--method", "segment-knn"], ["--window", "64"], ["--scales", "1,2"],
                  ["--device", "cpu"], ["--crf", "off"], ["--bank", bank]):
        code, _, err = run_cli(capsys, "predict", "--model", model, image, "--out", out, *extra)
        assert code == 2 and ("do not apply" in err or "built in" in err), (extra, err)


def test_overlays_carry_a_legend():
    from spml_fast.predict import overlay
    image = np.full((40, 60, 3), 128, np.uint8)
    labels = np.zeros((40, 60), np.uint8)
    labels[20:, 30:] = 2
    plain = overlay(image, labels)
    legend = overlay(image, labels, ["background", "cat", "dog"])
    assert legend.shape == plain.shape and not np.array_equal(legend[:26, :40], plain[:26, :40])
    assert np.array_equal(legend[30:, 45:], plain[30:, 45:])


def test_bad_files_and_settings_are_clean_errors(deploy_run, tmp_path, capsys):
    data, run, bank = deploy_run
    broken = str(tmp_path / "broken")
    shutil.copytree(run, broken)
    checkpoint = os.path.join(broken, "checkpoint.pt")
    with open(checkpoint, "r+b") as handle:
        handle.truncate(os.path.getsize(checkpoint) // 2)
    code, _, err = run_cli(capsys, "eval", "--checkpoint", broken)
    assert code == 2 and "checkpoint.pt is not a readable checkpoint" in err
    open(checkpoint, "wb").write(b"garbage")
    assert run_cli(capsys, "bank", "--checkpoint", broken, "--out", str(tmp_path / "b.safetensors"))[0] == 2
    shutil.copy(os.path.join(run, "checkpoint.pt"), checkpoint)
    config = json.load(open(os.path.join(broken, "config.json")))
    config["optim"]["learning_rate"] = 1.0
    json.dump(config, open(os.path.join(broken, "config.json"), "w"))
    code, _, err = run_cli(capsys, "eval", "--checkpoint", broken)
    assert code == 2 and "unknown setting 'optim.learning_rate'" in err
    image = os.path.join(data, "JPEGImages", "0000.png")
    code, _, err = run_cli(capsys, "predict", "--model", str(tmp_path / "none.onnx"), image, "--out", str(tmp_path))
    assert code == 2 and "none.onnx: no such file" in err
    (tmp_path / "torn.onnx").write_bytes(b"\x08\x07\x12\x04torn")
    code, _, err = run_cli(capsys, "predict", "--model", str(tmp_path / "torn.onnx"), image, "--out", str(tmp_path))
    assert code == 2 and "torn.onnx: not a readable ONNX model" in err
    code, _, err = run_cli(capsys, "eval", "--checkpoint", run, "--classes", "4")
    assert code == 2 and "--classes gives 4 classes" in err
    (tmp_path / "gone.txt").write_text("JPEGImages/gone1.png segcls/gone1.png\n")
    code, out, err = run_cli(capsys, "eval", "--checkpoint", run, "--list", str(tmp_path / "gone.txt"), "--skip-bad",
                             "--json", "--allow-outside-root")
    assert code == 2 and "missing" in err and "NaN" not in out


def test_public_names_and_help_texts():
    import spml_fast
    assert spml_fast.Segmenter.__name__ == "Segmenter" and spml_fast.PrototypeBank.__name__ == "PrototypeBank"
    assert spml_fast.PredictorConfig().k == 20
    parser = build_parser()
    for command, sub in parser._subparsers._group_actions[0].choices.items():
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"spml-fast {command} {action.option_strings[0]} has no help text"
