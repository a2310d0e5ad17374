"""Each default lives once: in its dataclass or one named constant. The checks below held settings that
were once written in several places (k, kappa, the k-means grid, the TEL/AGMM weights, an objective's
name, the CLI's copies of dataclass defaults, the crop, the resume rule, the tree-energy weight)."""
import inspect
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = [p for folder in ("spml_fast", "export", "triton_kernels", "benchmarks") for p in (ROOT / folder).rglob("*.py")]


def sources(pattern: str) -> list[str]:
    """'file:line' of every package line matching ``pattern`` outside comments."""
    hits = []
    for path in PACKAGE:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(pattern, code):
                hits.append(f"{path.relative_to(ROOT)}:{number}")
    return hits


def test_k_has_one_default():
    from spml_fast.config import DEFAULT_K, TrainConfig
    from spml_fast.export.graph import SegmenterGraph
    from spml_fast.export.onnx_export import ExportConfig
    from spml_fast.inference import PredictorConfig
    assert TrainConfig().eval_k == PredictorConfig().k == DEFAULT_K
    assert inspect.signature(SegmenterGraph).parameters["k"].default is inspect.Parameter.empty
    assert ExportConfig().k is None                                  # the predictor's (the run's) k
    assert sources(r"\bk\s*:\s*int\s*=\s*20\b") == []
    assert [hit.split(":")[0] for hit in sources(r"^DEFAULT_K\s*=")] == ["spml_fast/config.py"]


def test_kappa_is_always_given():
    from spml_fast.ops import pixel_segment_loss
    from spml_fast.ops.reference import pixel_segment_loss_dense
    for function in (pixel_segment_loss, pixel_segment_loss_dense):
        assert inspect.signature(function).parameters["kappa"].default is inspect.Parameter.empty


def test_kmeans_settings_have_one_default_and_segment_knn_gets_the_run_s_grid(tmp_path):
    from spml_fast import segments
    from spml_fast.config import PRESETS, TrainConfig
    from spml_fast.inference import PredictorConfig
    assert TrainConfig().kmeans_grid == PredictorConfig().segment_grid == segments.KMEANS_GRID
    assert TrainConfig().kmeans_iterations == PredictorConfig().segment_iterations == segments.KMEANS_ITERATIONS
    parameters = inspect.signature(segments.make_segments).parameters
    assert parameters["grid"].default == segments.KMEANS_GRID
    from spml_fast.predictor import run_settings
    from spml_fast.run import Run
    config = PRESETS["synthetic-scribble-spml"]
    settings = run_settings(Run(str(tmp_path), config, ["a", "b"]), method="segment-knn")
    assert settings.segment_grid == config.bank_grid == 12 and settings.segment_iterations == config.kmeans_iterations


def test_each_objective_has_one_name_and_its_weights_once():
    from spml_fast import config, robustness
    for name, objective in config.OBJECTIVES.items():
        assert config.PRESETS[f"synthetic-scribble-{name}"].objective == objective
    assert list(robustness.OBJECTIVES) == list(config.OBJECTIVES)
    assert config.PRESETS["synthetic-scribble"].objective == config.OBJECTIVES[config.DEFAULT_OBJECTIVE]
    assert sources(r"tel\+agmm|hybrid\+tel|TREE_ENERGY_GAUSSIAN_MIXTURE") == []
    assert sources(r"(tree_energy|gaussian_mixture)\s*=\s*0\.\d") == []      # only the named weights
    assert len(sources(r"^(TREE_ENERGY|GAUSSIAN_MIXTURE)_WEIGHT\s*=")) == 2


def test_the_cli_reads_dataclass_defaults():
    from spml_fast.cam import CamConfig
    from spml_fast.classifier import ClassifierConfig
    from spml_fast.cli import build_parser
    from spml_fast.export.onnx_export import ExportConfig
    from spml_fast.export.triton_repo import ServingConfig
    from spml_fast.synth import SynthConfig
    commands = build_parser()._subparsers._group_actions[0].choices

    def default(command, flag):
        return next(a.default for a in commands[command]._actions if flag in a.option_strings)
    synth = SynthConfig()
    for flag, value in (("--train-images", synth.train_images), ("--val-images", synth.val_images),
                        ("--size", synth.size), ("--seed", synth.seed), ("--shading", synth.shading)):
        assert default("synth", flag) == value
    assert default("cam", "--iterations") == CamConfig().iterations
    assert default("cam", "--threshold") == CamConfig().threshold
    assert default("train-classifier", "--epochs") == ClassifierConfig().epochs
    assert default("export", "--extra-classes") == ExportConfig().extra_classes
    assert default("export", "--max-batch") == ServingConfig().max_batch_size
    assert default("export", "--name") == ServingConfig().name


def test_crop_resume_rule_and_tree_energy_weight_live_once():
    from spml_fast.cam import CamConfig
    from spml_fast.data import AugmentConfig
    assert CamConfig().crop == AugmentConfig().crop
    assert sources(r"crop\s*:\s*int\s*=\s*\d") == ["spml_fast/data.py:" + str(next(
        n for n, line in enumerate((ROOT / "spml_fast/data.py").read_text().splitlines(), 1)
        if re.search(r"crop\s*:\s*int\s*=\s*\d", line)))]
    assert [hit.split(":")[0] for hit in sources(r"RUNTIME_SETTINGS")] == ["spml_fast/config.py"] * 2
    assert [hit.split(":")[0] for hit in sources(r"def check_resume")] == ["spml_fast/config.py"]
    # the weight of a head term is read by name in one place (objective.term_weights)
    assert sources(r"\b(config|objective|self)\.(tree_energy|gaussian_mixture|partial_ce)\b") == []
