"""``spml-fast export``: a trained run plus its prototype bank (or a classifier
head) to an ONNX model, a TensorRT engine or a Triton model repository, with
parity against the PyTorch predictor checked on every export.

Files written for ``--out model.onnx``: ``model.onnx``, ``model.parity.json``;
for ``--format tensorrt --out model.plan`` also ``model.onnx`` (FP32, the
parity reference), ``model.fp16.onnx`` (strongly typed builds), ``model.json``
(metadata) and ``model.plan.parity.json``; for ``--format triton-repo --out
DIR`` the repository (see ``triton_repo``).
"""
from __future__ import annotations

import os
from dataclasses import asdict, replace

import torch

from spml_fast.data import MEAN, STD
from spml_fast.io import atomic_path, save_json
from spml_fast.predictor import Predictor

from . import parity as parity_check
from .graph import SegmenterGraph
from .onnx_export import ExportConfig, class_capacity, export_onnx, sample_inputs, unsupported_ops
from .triton_repo import ServingConfig, check_model_name, write_repository

FORMATS = ("onnx", "tensorrt", "triton-repo")


def check_exportable(predictor: Predictor) -> None:
    """The graph holds pixel k-NN against the bank or the class head; segment k-NN, windows and scales are
    the PyTorch predictor's only."""
    if predictor.method not in ("pixel-knn", "classifier"):
        raise ValueError(f"--method {predictor.method}: an exported graph predicts with pixel-knn or classifier")


def export_settings(predictor: Predictor, config: ExportConfig) -> ExportConfig:
    """The export's k: the one given, else the predictor's (the run's ``eval_k``)."""
    return replace(config, k=predictor.k) if config.k is None else config


def metadata(predictor: Predictor, config: ExportConfig) -> dict:
    dim = predictor.bank.dim if predictor.bank is not None else predictor.classifier.classifier.in_channels
    return dict(class_names=predictor.class_names, num_classes=class_capacity(config, len(predictor.class_names)),
                dim=dim,
                mean=list(MEAN), std=list(STD), k=config.k, method=predictor.method,
                uint8_input=config.uint8_input, bank_as_input=config.bank_as_input,
                checkpoint=predictor.checkpoint, checkpoint_sha256=predictor.checkpoint_sha256(),
                bank_size=int(predictor.bank.labels.numel()) if predictor.bank is not None else 0,
                crf=asdict(predictor.crf) if predictor.crf is not None and predictor.crf.enabled else None,
                outputs="labels int32 [B, H, W]; scores float32 [B, K, H, W]")


def build_graph(predictor: Predictor, config: ExportConfig, backbone_dtype=torch.float32) -> SegmenterGraph:
    if config.bank_as_input and predictor.bank is None:
        raise ValueError("--bank-as-input needs a k-NN model (--bank), not a classifier head")
    bank = None
    if predictor.bank is not None and not config.bank_as_input:
        bank = (predictor.bank.prototypes.cpu(), predictor.bank.labels.cpu())
    return SegmenterGraph(predictor.network.cpu().eval(), class_capacity(config, len(predictor.class_names)),
                          config.k, config.uint8_input, bank, graph_head(predictor), backbone_dtype).eval()


def graph_head(predictor: Predictor):
    """The class head as the graph computes it (a cosine head folded into one linear map), or None."""
    return predictor.classifier.cpu().folded() if predictor.classifier is not None else None


def reference_predictor(predictor: Predictor, config: ExportConfig):
    """PyTorch scores [B, K, H, W] of graph inputs by the library's predictor (inference.predict_scores)."""
    from spml_fast.inference import PredictorConfig, predict_scores
    head = predictor.bank.to("cpu") if predictor.bank is not None else graph_head(predictor)
    settings = PredictorConfig(method=predictor.method, k=config.k)     # the graph's scores: no CRF
    extra = class_capacity(config, len(predictor.class_names)) - len(predictor.class_names)
    network = predictor.network.cpu().eval()

    def scores(inputs):
        result = predict_scores(network, parity_check.to_normalised(inputs[0], config.uint8_input), head, settings)
        return torch.nn.functional.pad(result, (0, 0, 0, 0, 0, extra)).numpy()   # unused class channels: 0
    return scores


def _check_graph(path: str) -> None:
    problems = unsupported_ops(path)
    if problems:
        raise RuntimeError(f"{path}: the exported graph has ops TensorRT cannot run: " + "; ".join(problems))


def export_onnx_checked(predictor: Predictor, path: str, config: ExportConfig,
                        shapes=parity_check.DEFAULT_SHAPES, providers: str = "cpu") -> dict:
    """Export, check the op whitelist, run parity (ORT vs PyTorch); returns the parity report. The model
    is staged beside ``path`` and replaces it only once it passed: a failed export leaves the previous
    model and its parity report byte-identical."""
    from spml_fast.runtime import Segmenter
    info = metadata(predictor, config)
    with atomic_path(path) as staged:
        exporter = export_onnx(build_graph(predictor, config), staged, config, info, predictor.bank)
        _check_graph(staged)
        segmenter = Segmenter(staged, providers=providers, bank=predictor.bank, apply_crf=False)
        report = parity_check.check_parity(
            reference_predictor(predictor, config), segmenter.run,
            lambda b, h, w: sample_inputs(config, h, w, b, predictor.bank, seed=h * w),
            predictor.method == "classifier", shapes, report_path=None, engine=f"onnxruntime ({providers})")
    report["exporter"] = exporter
    save_json(parity_path(path), report)
    return report


def parity_path(model_path: str) -> str:
    return os.path.splitext(model_path)[0] + ".parity.json"


def export_tensorrt(predictor: Predictor, plan_path: str, config: ExportConfig, profile=None) -> dict:
    """ONNX (FP32 reference, FP16-backbone graph for strongly typed builds) -> engine -> parity vs ORT;
    the engine replaces ``plan_path`` only once it passed."""
    from spml_fast.runtime import Segmenter

    from .tensorrt import Profile, TensorRTRunner, build_engine, require_tensorrt, strongly_typed_supported
    trt = require_tensorrt()
    stem = os.path.splitext(plan_path)[0]
    onnx_report = export_onnx_checked(predictor, stem + ".onnx", config)
    source = stem + ".onnx"
    if strongly_typed_supported(trt):
        source = stem + ".fp16.onnx"
        export_onnx(build_graph(predictor, config, torch.float16), source, config,
                    metadata(predictor, config), predictor.bank)
        _check_graph(source)
    bank_size = int(predictor.bank.labels.numel()) if config.bank_as_input else None
    with atomic_path(plan_path) as staged:
        build = build_engine(source, staged, profile or Profile(), config.uint8_input, True, bank_size)
        runner = TensorRTRunner(staged)
        reference = Segmenter(stem + ".onnx", providers="cpu", bank=predictor.bank, apply_crf=False)
        report = parity_check.check_parity(   # the engine against ONNX Runtime on the FP32 graph
            lambda inputs: reference.run(*inputs)[1], lambda *inputs: tuple(runner(*inputs)),
            lambda b, h, w: sample_inputs(config, h, w, b, predictor.bank, seed=h * w + 1),
            predictor.method == "classifier", parity_check.DEFAULT_SHAPES, report_path=None,
            engine=f"TensorRT {build['tensorrt']} vs onnxruntime")
    save_json(stem + ".json", dict(metadata(predictor, config), engine=build))
    save_json(plan_path + ".parity.json", report)
    return dict(onnx=onnx_report, tensorrt=report, build=build)


def export_run(predictor: Predictor, fmt: str, out: str, config: ExportConfig,
               serving: ServingConfig = ServingConfig(), repo_model: str = "onnx") -> dict:
    """One command from a run to an artefact; see the module doc for the files. Nothing that existed is
    replaced before the new artefact is complete and has passed parity."""
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {FORMATS}, got {fmt!r}")
    check_exportable(predictor)
    config = export_settings(predictor, config)
    if fmt == "onnx":
        return dict(onnx=export_onnx_checked(predictor, out, config))
    if fmt == "tensorrt":
        return export_tensorrt(predictor, out, config)
    check_model_name(serving.name)
    import tempfile
    os.makedirs(out, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=f".tmp-{os.getpid()}-build.") as build:
        if repo_model == "plan":
            reports = export_tensorrt(predictor, os.path.join(build, "model.plan"), config)
            model_file = os.path.join(build, "model.plan")
        else:
            reports = dict(onnx=export_onnx_checked(predictor, os.path.join(build, "model.onnx"), config))
            model_file = os.path.join(build, "model.onnx")
        folder = write_repository(model_file, out, metadata(predictor, config), serving, reports)
    return dict(reports, repository=folder)
