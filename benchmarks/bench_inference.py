"""Inference engines on the same segmenter, side by side: images/s and latency
percentiles of one image (batch 1) at 512x512 and 1024x2048.

The model is the built-in preset's network (``synthetic-scribble``: small
backbone, D = 32) with seeded random weights and a seeded bank over 6
classes, k = 10; speed does not depend on trained weights. The headline cases
use a serving bank of 1,024 prototypes (``spml-fast bank --max-size 1024``);
one case with 4,096 shows how the bank size moves the ratio: the [h*w, M]
similarity block of the exported graph is memory-bound on a CPU, where the
PyTorch predictor streams it in chunks.
Implementations:
  pytorch-eager  - the library's PyTorch predictor (``inference.predict_scores``:
                   embedding network, tiled k-NN vote, resize), the baseline
  onnxruntime    - the exported ONNX graph in ONNX Runtime (CPU provider on the CPU)
and on a GPU also onnxruntime-cuda, onnxruntime-tensorrt (the EPs) and the
tensorrt engine, each skipped with the reason when its runtime is missing.
The export happens in the implementation's own process, outside the timing.
"""
from __future__ import annotations

import os
import tempfile

import numpy as np
import torch
import torch.nn.functional as F

SUITE = "inference"
BASELINE = "pytorch-eager"
CLASSES = ["background", "stripes", "dots", "checks", "waves", "speckle"]


def cases(quick: bool, device: str) -> list[dict]:
    if quick:
        return [dict(name="256x256-b1", height=256, width=256, batch=1, bank=1024, k=10, repeats=5)]
    return [dict(name="512x512-b1", height=512, width=512, batch=1, bank=1024, k=10, repeats=30),
            dict(name="512x512-b1-bank4096", height=512, width=512, batch=1, bank=4096, k=10, repeats=20),
            dict(name="1024x2048-b1", height=1024, width=2048, batch=1, bank=1024, k=10, repeats=8)]


def _model_and_bank(case):
    from spml_fast.bank import PrototypeBank
    from spml_fast.config import PRESETS
    from spml_fast.models import EmbeddingNet
    torch.manual_seed(0)
    net = EmbeddingNet(PRESETS["synthetic-scribble"].model).eval()
    generator = torch.Generator().manual_seed(1)
    prototypes = F.normalize(torch.randn(case["bank"], net.config.embedding_dim, generator=generator), dim=1)
    labels = torch.randint(0, len(CLASSES), (case["bank"],), generator=generator)
    return net, PrototypeBank(prototypes, labels, list(CLASSES))


def _images(case) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.random((case["batch"], 3, case["height"], case["width"]), dtype=np.float32)


def _export(case) -> str:
    from spml_fast.export.onnx_export import ExportConfig
    from spml_fast.export.onnx_export import export_onnx
    from spml_fast.export.pipeline import build_graph, metadata
    from spml_fast.inference import PredictorConfig
    from spml_fast.predictor import Predictor
    net, bank = _model_and_bank(case)
    deployable = Predictor(None, net, bank, PredictorConfig(k=case["k"]), bank.class_names)
    config = ExportConfig(k=case["k"])
    path = os.path.join(tempfile.mkdtemp(prefix="spml-bench-"), "model.onnx")
    export_onnx(build_graph(deployable, config), path, config, metadata(deployable, config), bank)
    return path


def _pytorch(case, device):
    from spml_fast.data import normalise
    from spml_fast.inference import PredictorConfig, predict_scores
    net, bank = _model_and_bank(case)
    net, bank = net.to(device), bank.to(device)
    images = torch.from_numpy(_images(case)).to(device)
    config = PredictorConfig(k=case["k"])

    def step():
        scores = predict_scores(net, normalise(images), bank, config)
        labels = scores.argmax(1)
        if device == "cuda":
            torch.cuda.synchronize()
        return labels
    return step


def _onnxruntime(providers: str):
    def make(case, device):
        from spml_fast.runtime import Segmenter
        segmenter = Segmenter(_export(case), providers=providers)
        images = _images(case)
        return lambda: segmenter.run(images)
    return make


def _tensorrt_engine(case, device):
    from spml_fast.export.tensorrt import Profile, TensorRTRunner, build_engine
    path = _export(case)
    plan = path.replace(".onnx", ".plan")
    shape = (case["batch"], case["height"], case["width"])
    build_engine(path, plan, Profile(min=shape, opt=shape, max=shape), uint8_input=False)
    runner = TensorRTRunner(plan)
    images = torch.from_numpy(_images(case)).cuda()
    return lambda: runner.run_torch(images)


IMPLEMENTATIONS = {"pytorch-eager": _pytorch, "onnxruntime": _onnxruntime("cpu"),
                   "onnxruntime-cuda": _onnxruntime("cuda"), "onnxruntime-tensorrt": _onnxruntime("tensorrt"),
                   "tensorrt": _tensorrt_engine}


def skip_reason(case: dict, impl: str, device: str):
    if impl in ("pytorch-eager",):
        return None
    if impl == "onnxruntime":
        return None if device == "cpu" else "CPU provider measured in the CPU run"
    if device != "cuda":
        return "no GPU"
    import onnxruntime as ort
    needed = {"onnxruntime-cuda": "CUDAExecutionProvider", "onnxruntime-tensorrt": "TensorrtExecutionProvider"}
    if impl in needed and needed[impl] not in ort.get_available_providers():
        return f"{needed[impl]} not in this onnxruntime (install onnxruntime-gpu)"
    if impl == "tensorrt":
        import importlib.util
        if importlib.util.find_spec("tensorrt") is None:
            return "tensorrt not installed"
    return None


def parity(case: dict, device: str) -> dict:
    """Labels of ONNX Runtime (CPU) against the PyTorch predictor on the benchmark image."""
    from spml_fast.runtime import Segmenter
    labels, _ = Segmenter(_export(case), providers="cpu").run(_images(case))
    reference = _pytorch(case, "cpu")().numpy()
    return dict(status="ok", label_agreement=float((labels == reference).mean()))


def summarize(records: list, options: dict) -> list[str]:
    """images/s per implementation and the speed-up of each engine over PyTorch eager."""
    lines = []
    for record in records:
        if record.status == "ok":
            batch = record.params.get("batch", 1)
            lines.append(f"- {record.case} {record.impl}: {batch / record.time_s:.2f} images/s, latency p50 "
                         f"{record.time_s * 1e3:.1f} ms, p90 {record.time_p90_s * 1e3:.1f} ms, p99 "
                         f"{record.time_p99_s * 1e3:.1f} ms")
    return lines


SIZE_LABEL = "pixels per image"


def size(case: dict) -> int:
    return case["height"] * case["width"]
