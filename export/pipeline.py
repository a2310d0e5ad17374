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
from dataclasses import dataclass
from typing import Optional

import torch

from spml_fast.data import MEAN, STD
from spml_fast.io import save_json

from . import parity as parity_check
from .graph import SegmenterGraph
from .onnx_export import ExportConfig, class_capacity, export_onnx, sample_inputs, unsupported_ops
from .triton_repo import ServingConfig, write_repository

FORMATS = ("onnx", "tensorrt", "triton-repo")


@dataclass
class Deployable:
    """What an export needs: the embedding network and one head."""
    embedding_net: torch.nn.Module
    class_names: list
    bank: Optional[object] = None          # PrototypeBank
    classifier: Optional[torch.nn.Module] = None
    checkpoint: str = ""

    @property
    def method(self) -> str:
        return "classifier" if self.classifier is not None else "pixel-knn"


def load_deployable(checkpoint: str, bank_path: Optional[str] = None, classifier_path: Optional[str] = None,
                    device="cpu") -> Deployable:
    from spml_fast.bank import load_bank
    from spml_fast.classifier import load_classifier
    from spml_fast.evaluate import load_run
    model, _, class_names = load_run(checkpoint, device)
    if classifier_path:
        head, names = load_classifier(classifier_path, device)
        return Deployable(model.embedding, names, classifier=head, checkpoint=checkpoint)
    if model.classifier is not None and not bank_path:
        return Deployable(model.embedding, list(class_names), classifier=model.classifier, checkpoint=checkpoint)
    if not bank_path:
        raise ValueError("--bank BANK is required for an SPML run (or --classifier HEAD)")
    bank = load_bank(bank_path, device)
    return Deployable(model.embedding, bank.class_names, bank=bank, checkpoint=checkpoint)


def metadata(deployable: Deployable, config: ExportConfig) -> dict:
    dim = deployable.bank.dim if deployable.bank is not None else deployable.classifier.classifier.in_channels
    return dict(class_names=deployable.class_names, num_classes=class_capacity(config, len(deployable.class_names)),
                dim=dim,
                mean=list(MEAN), std=list(STD), k=config.k, method=deployable.method,
                uint8_input=config.uint8_input, bank_as_input=config.bank_as_input,
                checkpoint=os.path.abspath(deployable.checkpoint) if deployable.checkpoint else "",
                bank_size=int(deployable.bank.labels.numel()) if deployable.bank is not None else 0,
                outputs="labels int32 [B, H, W]; scores float32 [B, K, H, W]")


def build_graph(deployable: Deployable, config: ExportConfig, backbone_dtype=torch.float32) -> SegmenterGraph:
    if config.bank_as_input and deployable.bank is None:
        raise ValueError("--bank-as-input needs a k-NN model (--bank), not a classifier head")
    bank = None
    if deployable.bank is not None and not config.bank_as_input:
        bank = (deployable.bank.prototypes.cpu(), deployable.bank.labels.cpu())
    return SegmenterGraph(deployable.embedding_net.cpu().eval(), class_capacity(config, len(deployable.class_names)),
                          config.k,
                          config.uint8_input, bank, deployable.classifier, backbone_dtype).eval()


def reference_predictor(deployable: Deployable, config: ExportConfig):
    """PyTorch scores [B, K, H, W] of graph inputs by the library's predictor (inference.predict_scores)."""
    from spml_fast.inference import PredictorConfig, predict_scores
    head = deployable.bank if deployable.bank is not None else deployable.classifier
    predictor = PredictorConfig(method=deployable.method, k=config.k)
    extra = class_capacity(config, len(deployable.class_names)) - len(deployable.class_names)

    def scores(inputs):
        result = predict_scores(deployable.embedding_net, parity_check.to_normalised(inputs[0], config.uint8_input),
                                head, predictor)
        return torch.nn.functional.pad(result, (0, 0, 0, 0, 0, extra)).numpy()   # unused class channels: 0
    return scores


def _check_graph(path: str) -> None:
    problems = unsupported_ops(path)
    if problems:
        raise RuntimeError(f"{path}: the exported graph has ops TensorRT cannot run: " + "; ".join(problems))


def export_onnx_checked(deployable: Deployable, path: str, config: ExportConfig,
                        shapes=parity_check.DEFAULT_SHAPES, providers: str = "cpu") -> dict:
    """Export, check the op whitelist, run parity (ORT vs PyTorch); returns the parity report."""
    from spml_fast.runtime import Segmenter
    info = metadata(deployable, config)
    exporter = export_onnx(build_graph(deployable, config), path, config, info, deployable.bank)
    _check_graph(path)
    segmenter = Segmenter(path, providers=providers, bank=deployable.bank)
    report = parity_check.check_parity(
        reference_predictor(deployable, config), segmenter.run,
        lambda b, h, w: sample_inputs(config, h, w, b, deployable.bank, seed=h * w),
        deployable.method == "classifier", shapes,
        report_path=os.path.splitext(path)[0] + ".parity.json", engine=f"onnxruntime ({providers})")
    report["exporter"] = exporter
    return report


def export_tensorrt(deployable: Deployable, plan_path: str, config: ExportConfig, profile=None) -> dict:
    """ONNX (FP32 reference, FP16-backbone graph for strongly typed builds) -> engine -> parity vs ORT."""
    from spml_fast.runtime import Segmenter

    from .tensorrt import Profile, TensorRTRunner, build_engine, require_tensorrt, strongly_typed_supported
    trt = require_tensorrt()
    stem = os.path.splitext(plan_path)[0]
    onnx_report = export_onnx_checked(deployable, stem + ".onnx", config)
    source = stem + ".onnx"
    if strongly_typed_supported(trt):
        source = stem + ".fp16.onnx"
        export_onnx(build_graph(deployable, config, torch.float16), source, config,
                    metadata(deployable, config), deployable.bank)
        _check_graph(source)
    bank_size = int(deployable.bank.labels.numel()) if config.bank_as_input else None
    build = build_engine(source, plan_path, profile or Profile(), config.uint8_input, True, bank_size)
    save_json(stem + ".json", dict(metadata(deployable, config), engine=build))
    runner, reference = TensorRTRunner(plan_path), Segmenter(stem + ".onnx", providers="cpu", bank=deployable.bank)
    report = parity_check.check_parity(   # the engine against ONNX Runtime on the FP32 graph
        lambda inputs: reference.run(*inputs)[1], lambda *inputs: tuple(runner(*inputs)),
        lambda b, h, w: sample_inputs(config, h, w, b, deployable.bank, seed=h * w + 1),
        deployable.method == "classifier", parity_check.DEFAULT_SHAPES,
        report_path=plan_path + ".parity.json", engine=f"TensorRT {build['tensorrt']} vs onnxruntime")
    return dict(onnx=onnx_report, tensorrt=report, build=build)


def export_run(deployable: Deployable, fmt: str, out: str, config: ExportConfig,
               serving: ServingConfig = ServingConfig(), repo_model: str = "onnx") -> dict:
    """One command from a run to an artefact; see the module doc for the files."""
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {FORMATS}, got {fmt!r}")
    if fmt == "onnx":
        return dict(onnx=export_onnx_checked(deployable, out, config))
    if fmt == "tensorrt":
        return export_tensorrt(deployable, out, config)
    staging = os.path.join(out, ".staging")
    os.makedirs(staging, exist_ok=True)
    if repo_model == "plan":
        reports = export_tensorrt(deployable, os.path.join(staging, "model.plan"), config)
        model_file = os.path.join(staging, "model.plan")
    else:
        reports = dict(onnx=export_onnx_checked(deployable, os.path.join(staging, "model.onnx"), config))
        model_file = os.path.join(staging, "model.onnx")
    folder = write_repository(model_file, out, metadata(deployable, config), serving, reports)
    import shutil
    shutil.rmtree(staging, ignore_errors=True)
    return dict(reports, repository=folder)
