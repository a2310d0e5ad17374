"""Deployment: ONNX export (op whitelist, dynamic shapes, parity with the PyTorch
predictor at shapes other than the export shape), the bank as a graph input,
the runtime, the Triton repository against Triton's schema, TensorRT."""
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from spml_fast.bank import add_class, load_bank
from spml_fast.export.onnx_export import ExportConfig, read_metadata, unsupported_ops
from spml_fast.export.parity import ParityError, check_parity, compare
from spml_fast.export.pipeline import export_run
from spml_fast.predictor import open_predictor
from spml_fast.runtime import ProviderFallbackError, Segmenter, make_session

SHAPES = ((1, 56, 72), (2, 45, 61))            # none is the export shape (2, 128, 160)


@pytest.fixture(scope="module")
def deployable(deploy_run):
    _, run, bank = deploy_run
    return open_predictor(run, bank)


@pytest.fixture(scope="module")
def exported(deployable, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("onnx") / "model.onnx")
    report = export_run(deployable, "onnx", path, ExportConfig(k=5))["onnx"]
    return path, report


def test_export_is_dynamic_and_parity_holds(exported):
    path, report = exported
    assert report["passed"] and report["exporter"] == "dynamo"
    assert all(item["label_agreement"] >= 0.999 for item in report["shapes"])
    assert [tuple(item["shape"]) for item in report["shapes"]] != [(2, 128, 160)]
    assert os.path.exists(path.replace(".onnx", ".parity.json"))
    model = onnx.load(path)
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input]
    assert dims == [["batch", 3, "height", "width"]]
    assert model.opset_import[0].version >= 17
    meta = read_metadata(path)
    assert meta["k"] == 5 and meta["class_names"][0] == "background" and meta["uint8_input"] is False


def test_exported_graph_has_only_tensorrt_ops(exported):
    path, _ = exported
    assert unsupported_ops(path) == []
    ops = {node.op_type for node in onnx.load(path).graph.node}
    assert {"TopK", "Equal", "ReduceSum", "ArgMax"} <= ops              # the vote as the whitelist wants it
    assert not ops & {"ScatterElements", "OneHot", "ScatterND"}


def test_whitelist_walk_catches_forbidden_ops():
    from onnx import helper, TensorProto
    scatter = helper.make_node("ScatterElements", ["x", "i", "u"], ["y"], reduction="add")
    onehot = helper.make_node("OneHot", ["i", "d", "v"], ["z"])
    topk = helper.make_node("TopK", ["x", "k"], ["values", "indices"])
    big_k = helper.make_tensor("k", TensorProto.INT64, [1], [4000])
    graph = helper.make_graph([scatter, onehot, topk], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], initializer=[big_k])
    problems = unsupported_ops(helper.make_model(graph))
    assert len(problems) == 3
    assert any("reduction" in p for p in problems) and any("OneHot" in p for p in problems)
    assert any("4000" in p for p in problems)


def test_runtime_segmenter_batches_and_matches_the_session(exported):
    path, _ = exported
    segmenter = Segmenter(path, providers="cpu", batch_size=2, apply_crf=False)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (40, 52, 3), dtype=np.uint8) for _ in range(3)] + \
             [rng.integers(0, 255, (33, 47, 3), dtype=np.uint8)]
    labels = segmenter.predict(images)
    assert [l.shape for l in labels] == [(40, 52)] * 3 + [(33, 47)]
    single, scores = segmenter.run(images[3][None].transpose(0, 3, 1, 2).astype(np.float32) / 255.0)
    np.testing.assert_array_equal(single[0], labels[3])
    # the run evaluated with a CRF: by default the runtime applies it after the graph, as eval does
    from spml_fast.crf import refine
    with_crf = Segmenter(path, providers="cpu", batch_size=2)
    assert with_crf.crf is not None and with_crf.crf.enabled
    np.testing.assert_array_equal(with_crf.predict(images)[3], refine(scores[0], images[3], with_crf.crf).argmax(0))
    with pytest.raises(ValueError, match=r"images\[0\]"):
        segmenter.predict([np.zeros((10, 10), np.uint8)])


def test_gpu_provider_without_gpu_is_an_error(exported):
    import onnxruntime as ort
    if "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available():
        pytest.skip("a CUDA provider is available here: no fallback to provoke")
    with pytest.raises(ProviderFallbackError, match="CUDAExecutionProvider"):
        make_session(exported[0], providers="cuda")


def test_uint8_input_and_argmax(deployable, tmp_path):
    path = str(tmp_path / "u8.onnx")
    report = export_run(deployable, "onnx", path, ExportConfig(k=1, uint8_input=True))["onnx"]
    assert report["passed"]
    session_input = make_session(path, "cpu").get_inputs()[0]
    assert session_input.type == "tensor(uint8)" and session_input.shape[-1] == 3


def test_bank_as_input_swaps_banks_without_reexport(deployable, deploy_run, tmp_path):
    data, run, bank_path = deploy_run
    path = str(tmp_path / "bank_input.onnx")
    assert export_run(deployable, "onnx", path, ExportConfig(k=5, bank_as_input=True))["onnx"]["passed"]
    bank = load_bank(bank_path)
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)
    before = Segmenter(path, providers="cpu", bank=bank).predict([image])[0]
    # a new class whose prototypes are this image's own embeddings: it must win pixels
    from spml_fast.export.parity import to_normalised
    embedding = deployable.network(to_normalised(image[None].transpose(0, 3, 1, 2) / 255.0, False))
    own = embedding[0].flatten(1).t().detach()
    extended = add_class(bank, "novel", own, torch.ones(own.shape[0], dtype=torch.int64))
    after = Segmenter(path, providers="cpu", bank=extended).predict([image])[0]
    novel = len(bank.class_names)
    assert not (before == novel).any() and (after == novel).mean() > 0.5


def test_parity_mismatch_raises_and_ties_are_reported():
    reference = np.zeros((1, 3, 4, 4))
    reference[:, 0] = 0.4
    reference[:, 1] = 0.4                                           # classes 0 and 1 tie everywhere
    reference[:, 2] = 0.2
    tied = compare(reference, np.ones((1, 4, 4), np.int32), reference.astype(np.float32), False, (1, 4, 4))
    assert tied.passed and tied.label_agreement == 1.0 and tied.label_agreement_strict == 0.0
    wrong = compare(reference, np.full((1, 4, 4), 2, np.int32), reference, False, (1, 4, 4))
    assert not wrong.passed and wrong.label_agreement == 0.0
    with pytest.raises(ParityError, match="MISMATCH"):
        check_parity(lambda inputs: reference, lambda *inputs: (np.full((1, 4, 4), 2), reference),
                     lambda b, h, w: (np.zeros((1, 3, 4, 4), np.float32),), False, shapes=((1, 4, 4),))


def test_triton_repository_parses_against_the_schema(deployable, tmp_path):
    pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient[grpc] not installed")
    from spml_fast.export.triton_repo import parse_config
    result = export_run(deployable, "triton-repo", str(tmp_path / "repo"), ExportConfig(k=5, uint8_input=True))
    folder = result["repository"]
    assert os.path.exists(os.path.join(folder, "1", "model.onnx"))
    config = parse_config(os.path.join(folder, "config.pbtxt"))
    assert config.platform == "onnxruntime_onnx" and config.max_batch_size == 8
    assert [tuple(i.dims) for i in config.input] == [(-1, -1, 3)]
    assert config.input[0].data_type == config.input[0].data_type.__class__(2)          # TYPE_UINT8
    assert config.dynamic_batching.max_queue_delay_microseconds == 100
    assert config.instance_group[0].kind == 1                                            # KIND_GPU
    assert config.optimization.execution_accelerators.gpu_execution_accelerator[0].name == "tensorrt"
    preprocessing = json.load(open(os.path.join(folder, "preprocessing.json")))
    assert preprocessing["mean"] and preprocessing["parity"]["onnx"]["passed"]
    as_input = export_run(deployable, "triton-repo", str(tmp_path / "repo2"), ExportConfig(k=5, bank_as_input=True))
    config = parse_config(os.path.join(as_input["repository"], "config.pbtxt"))
    assert config.max_batch_size == 0 and [i.name for i in config.input] == ["images", "prototypes",
                                                                             "prototype_labels"]


def test_tensorrt_engine_matches_onnxruntime(deployable, tmp_path):
    pytest.importorskip("tensorrt", reason="tensorrt not installed")
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    result = export_run(deployable, "tensorrt", str(tmp_path / "model.plan"), ExportConfig(k=5))
    assert result["tensorrt"]["passed"]
    labels = Segmenter(str(tmp_path / "model.plan")).predict([np.zeros((64, 80, 3), np.uint8)])
    assert labels[0].shape == (64, 80)


def test_cli_export_bank_and_predict(deploy_run, tmp_path):
    data, run, bank = deploy_run
    cli = [sys.executable, "-m", "spml_fast"]
    model = str(tmp_path / "cli.onnx")
    done = subprocess.run(cli + ["export", "--checkpoint", run, "--bank", bank, "--out", model, "--k", "3"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "labels agree" in done.stdout and os.path.exists(model)
    images = sorted(os.path.join(data, "JPEGImages", n) for n in os.listdir(os.path.join(data, "JPEGImages")))[:2]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    out = tmp_path / "pred"
    done = subprocess.run(cli + ["predict", "--model", model, "--providers", "cpu", *images, str(broken),
                                 "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 1 and "broken.jpg" in done.stderr                  # reported, skipped
    from PIL import Image
    for path in images:
        stem = os.path.splitext(os.path.basename(path))[0]
        label = Image.open(out / f"{stem}.png")
        assert label.mode == "P" and label.size == Image.open(path).size
        assert Image.open(out / f"{stem}_overlay.png").size == label.size
    missing = subprocess.run(cli + ["export", "--checkpoint", run, "--out", model], capture_output=True, text=True)
    assert missing.returncode == 2 and "--bank" in missing.stderr
