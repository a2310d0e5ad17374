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
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from spml_fast.data import MEAN, STD
from spml_fast.io import atomic_path, save_json

from . import parity as parity_check
from .graph import SegmenterGraph
from .onnx_export import ExportConfig, class_capacity, export_onnx, sample_inputs, unsupported_ops
from .triton_repo import ServingConfig, check_model_name, write_repository

FORMATS = ("onnx", "tensorrt", "triton-repo")


@dataclass
class Deployable:
    """What an export needs: the embedding network, one head, and the run's inference settings."""
    embedding_net: torch.nn.Module
    class_names: list
    bank: Optional[object] = None          # PrototypeBank
    classifier: Optional[torch.nn.Module] = None
    checkpoint: str = ""
    k: int = 20                            # the run's k (TrainConfig.eval_k)
    crf: Optional[object] = None           # the run's CrfConfig (applied after the graph by the runtime)

    @property
    def method(self) -> str:
        return "classifier" if self.classifier is not None else "pixel-knn"


def load_deployable(checkpoint: str, bank_path: Optional[str] = None, classifier_path: Optional[str] = None,
                    device="cpu") -> Deployable:
    """A run plus one head: a classifier file, the run's own head, or a bank built from this run."""
    from spml_fast.bank import load_bank
    from spml_fast.classifier import load_classifier
    from spml_fast.run import Run
    if bank_path and classifier_path:
        raise ValueError("give --bank or --classifier, not both")
    run = Run.open(checkpoint)
    model = run.model(device)
    settings = dict(checkpoint=run.checkpoint, k=run.config.eval_k, crf=run.config.crf)
    if classifier_path:
        head, names = load_classifier(classifier_path, device)
        return Deployable(model.embedding, names, classifier=head, **settings)
    if model.classifier is not None and not bank_path:
        return Deployable(model.embedding, list(run.class_names), classifier=model.classifier.folded(), **settings)
    if not bank_path:
        raise ValueError("--bank BANK is required for a run without a class head (or --classifier HEAD)")
    bank = load_bank(bank_path, device, run=run)
    return Deployable(model.embedding, bank.class_names, bank=bank, **settings)


def metadata(deployable: Deployable, config: ExportConfig) -> dict:
    dim = deployable.bank.dim if deployable.bank is not None else deployable.classifier.classifier.in_channels
    return dict(class_names=deployable.class_names, num_classes=class_capacity(config, len(deployable.class_names)),
                dim=dim,
                mean=list(MEAN), std=list(STD), k=config.k, method=deployable.method,
                uint8_input=config.uint8_input, bank_as_input=config.bank_as_input,
                checkpoint=os.path.abspath(deployable.checkpoint) if deployable.checkpoint else "",
                bank_size=int(deployable.bank.labels.numel()) if deployable.bank is not None else 0,
                crf=asdict(deployable.crf) if deployable.crf is not None and deployable.crf.enabled else None,
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
    predictor = PredictorConfig(method=deployable.method, k=config.k)     # the graph's scores: no CRF
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
    """Export, check the op whitelist, run parity (ORT vs PyTorch); returns the parity report. The model
    is staged beside ``path`` and replaces it only once it passed: a failed export leaves the previous
    model and its parity report byte-identical."""
    from spml_fast.runtime import Segmenter
    info = metadata(deployable, config)
    with atomic_path(path) as staged:
        exporter = export_onnx(build_graph(deployable, config), staged, config, info, deployable.bank)
        _check_graph(staged)
        segmenter = Segmenter(staged, providers=providers, bank=deployable.bank, apply_crf=False)
        report = parity_check.check_parity(
            reference_predictor(deployable, config), segmenter.run,
            lambda b, h, w: sample_inputs(config, h, w, b, deployable.bank, seed=h * w),
            deployable.method == "classifier", shapes, report_path=None, engine=f"onnxruntime ({providers})")
    report["exporter"] = exporter
    save_json(parity_path(path), report)
    return report


def parity_path(model_path: str) -> str:
    return os.path.splitext(model_path)[0] + ".parity.json"


def export_tensorrt(deployable: Deployable, plan_path: str, config: ExportConfig, profile=None) -> dict:
    """ONNX (FP32 reference, FP16-backbone graph for strongly typed builds) -> engine -> parity vs ORT;
    the engine replaces ``plan_path`` only once it passed."""
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
    with atomic_path(plan_path) as staged:
        build = build_engine(source, staged, profile or Profile(), config.uint8_input, True, bank_size)
        runner = TensorRTRunner(staged)
        reference = Segmenter(stem + ".onnx", providers="cpu", bank=deployable.bank, apply_crf=False)
        report = parity_check.check_parity(   # the engine against ONNX Runtime on the FP32 graph
            lambda inputs: reference.run(*inputs)[1], lambda *inputs: tuple(runner(*inputs)),
            lambda b, h, w: sample_inputs(config, h, w, b, deployable.bank, seed=h * w + 1),
            deployable.method == "classifier", parity_check.DEFAULT_SHAPES, report_path=None,
            engine=f"TensorRT {build['tensorrt']} vs onnxruntime")
    save_json(stem + ".json", dict(metadata(deployable, config), engine=build))
    save_json(plan_path + ".parity.json", report)
    return dict(onnx=onnx_report, tensorrt=report, build=build)


def export_run(deployable: Deployable, fmt: str, out: str, config: ExportConfig,
               serving: ServingConfig = ServingConfig(), repo_model: str = "onnx") -> dict:
    """One command from a run to an artefact; see the module doc for the files. Nothing that existed is
    replaced before the new artefact is complete and has passed parity."""
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {FORMATS}, got {fmt!r}")
    if fmt == "onnx":
        return dict(onnx=export_onnx_checked(deployable, out, config))
    if fmt == "tensorrt":
        return export_tensorrt(deployable, out, config)
    check_model_name(serving.name)
    import tempfile
    os.makedirs(out, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=f".tmp-{os.getpid()}-build.") as build:
        if repo_model == "plan":
            reports = export_tensorrt(deployable, os.path.join(build, "model.plan"), config)
            model_file = os.path.join(build, "model.plan")
        else:
            reports = dict(onnx=export_onnx_checked(deployable, os.path.join(build, "model.onnx"), config))
            model_file = os.path.join(build, "model.onnx")
        folder = write_repository(model_file, out, metadata(deployable, config), serving, reports)
    return dict(reports, repository=folder)
