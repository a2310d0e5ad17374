"""``Segmenter``: runs an exported segmenter (``.onnx`` through ONNX Runtime,
or a TensorRT engine ``.plan``/``.engine``) on images and returns label maps.

Providers: ``auto`` takes TensorRT EP, then CUDA EP, then the CPU, as far as
the installed onnxruntime offers them; ``tensorrt``/``cuda`` ask for that
provider and raise when the session fell back to the CPU; ``cpu`` is the
CPU only. On a GPU provider the inputs and outputs go through IO binding.
Images of one size are batched together (``batch_size`` at a time).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np

PROVIDERS = {
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "cpu": ["CPUExecutionProvider"],
}


class ProviderFallbackError(RuntimeError):
    """A GPU provider was asked for but the session runs on the CPU."""


def make_session(path: str, providers: str = "auto", threads: Optional[int] = None):
    """An onnxruntime InferenceSession on the chosen providers (see module doc)."""
    import onnxruntime as ort
    if providers not in ("auto", *PROVIDERS):
        raise ValueError(f"providers must be auto, tensorrt, cuda or cpu, got {providers!r}")
    available = ort.get_available_providers()
    if providers == "auto":
        wanted = [p for p in PROVIDERS["tensorrt"] if p in available]
    else:
        wanted = PROVIDERS[providers]
        if wanted[0] not in available:
            raise ProviderFallbackError(f"providers={providers}: {wanted[0]} is not in this onnxruntime "
                                        f"({', '.join(available)}); install onnxruntime-gpu")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(path, options, providers=wanted)
    except Exception as error:  # onnxruntime's own errors for a torn or invalid model
        raise ValueError(f"--model {path}: not a readable ONNX model ({type(error).__name__}: "
                         f"{str(error).splitlines()[0][:200]})") from None
    if providers in ("tensorrt", "cuda") and session.get_providers()[0] != wanted[0]:
        raise ProviderFallbackError(f"providers={providers}: the session fell back to {session.get_providers()} "
                                    f"(is the CUDA/TensorRT runtime loadable?)")
    return session


def check_bank_of_model(bank, metadata: dict, model: str) -> None:
    """A bank fed to a ``--bank-as-input`` model must come from the checkpoint the model was exported from
    (the SHA-256 both record): another run's prototypes live in another embedding space."""
    expected = metadata.get("checkpoint_sha256")
    recorded = bank.metadata.get("checkpoint_sha256")
    if expected and recorded != expected:
        raise ValueError(f"--bank: built from another checkpoint ({bank.metadata.get('checkpoint', '?')}) than "
                         f"{model} was exported from ({metadata.get('checkpoint', '?')}); build the bank from "
                         "that run")


class Segmenter:
    """images -> label maps with an exported model.

    Args:
        model: ``.onnx`` file, or a TensorRT engine (``.plan``/``.engine``).
        providers: auto | tensorrt | cuda | cpu (ONNX models).
        bank: a ``PrototypeBank`` (or the path of one) for a model exported with ``--bank-as-input``.
        batch_size: images of equal size run together, this many at a time.
        apply_crf: refine the scores with the dense CRF the run evaluated with, when the export recorded
            one (``predict`` then reproduces ``eval``); the graph itself holds no CRF.
    """

    def __init__(self, model: str, providers: str = "auto", bank=None, batch_size: int = 4,
                 threads: Optional[int] = None, apply_crf: bool = True):
        import os
        from spml_fast.export.onnx_export import read_metadata
        if not os.path.isfile(model):
            raise ValueError(f"--model {model}: no such file")
        self.path = model
        self.batch_size = max(1, int(batch_size))
        self.engine = None
        self.session = None
        if model.endswith((".plan", ".engine")):
            import json
            import os
            from spml_fast.export.tensorrt import TensorRTRunner
            self.engine = TensorRTRunner(model)
            sidecar = os.path.splitext(model)[0] + ".json"
            if not os.path.exists(sidecar):
                raise ValueError(f"{model}: no metadata {sidecar} beside the engine")
            with open(sidecar) as handle:
                self.metadata = json.load(handle)
        elif model.endswith(".onnx"):
            self.metadata = read_metadata(model)
            self.session = make_session(model, providers, threads)
        else:
            raise ValueError(f"model {model}: expected a .onnx file or a TensorRT .plan/.engine")
        self.uint8_input = bool(self.metadata.get("uint8_input"))
        self.class_names = self.metadata.get("class_names", [])
        self.bank_inputs = ()
        if self.metadata.get("bank_as_input"):
            if bank is None:
                raise ValueError(f"{model} takes the bank as an input: pass bank=")
            if isinstance(bank, str):
                from spml_fast.bank import load_bank
                bank = load_bank(bank)
            check_bank_of_model(bank, self.metadata, model)
            capacity = int(self.metadata.get("num_classes", bank.num_classes))
            if bank.num_classes > capacity:
                raise ValueError(f"bank has {bank.num_classes} classes; {model} was exported with room for "
                                 f"{capacity} (export again with a larger --extra-classes)")
            self.bank_inputs = (bank.prototypes.float().numpy(), bank.labels.long().numpy())
            self.class_names = bank.class_names
        crf = self.metadata.get("crf") if apply_crf else None
        from spml_fast.crf import CrfConfig
        self.crf = CrfConfig(**crf) if crf else None

    @property
    def providers(self) -> list[str]:
        return ["TensorRT engine"] if self.engine else self.session.get_providers()

    def _prepare(self, images: np.ndarray) -> np.ndarray:
        """uint8 [B, H, W, 3] -> the model's input layout."""
        if self.uint8_input:
            return np.ascontiguousarray(images)
        return np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / 255.0

    def run(self, *inputs) -> tuple[np.ndarray, np.ndarray]:
        """Raw graph call: inputs in the model's layout -> (labels [B, H, W] int32, scores [B, K, H, W])."""
        if len(inputs) == 1:                                 # images only: add the bank, if it is an input
            inputs = tuple(inputs) + self.bank_inputs
        if self.engine is not None:
            labels, scores = self.engine(*inputs)
            return labels, scores
        names = [i.name for i in self.session.get_inputs()]
        if self.session.get_providers()[0] == "CPUExecutionProvider":
            labels, scores = self.session.run(["labels", "scores"], dict(zip(names, inputs)))
            return labels, scores
        binding = self.session.io_binding()                 # GPU: bind, copy once each way
        for name, value in zip(names, inputs):
            binding.bind_cpu_input(name, value)
        binding.bind_output("labels", "cuda")
        binding.bind_output("scores", "cuda")
        self.session.run_with_iobinding(binding)
        labels, scores = binding.copy_outputs_to_cpu()
        return labels, scores

    def predict(self, images: Union[np.ndarray, Sequence[np.ndarray]]) -> list[np.ndarray]:
        """uint8 RGB images [H, W, 3] (a list, or one [B, H, W, 3] array) -> label maps [H, W] int32."""
        if isinstance(images, np.ndarray) and images.ndim == 3:
            images = [images]
        images = list(images)
        for index, image in enumerate(images):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"images[{index}]: expected uint8 [H, W, 3], got {image.dtype} {image.shape}")
        results: list[Optional[np.ndarray]] = [None] * len(images)
        by_size: dict[tuple, list[int]] = {}
        for index, image in enumerate(images):
            by_size.setdefault(image.shape[:2], []).append(index)
        for indices in by_size.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                labels, scores = self.run(self._prepare(np.stack([images[i] for i in chunk])))
                for i, label, score in zip(chunk, labels, scores):
                    if self.crf is not None:
                        from spml_fast.crf import refine
                        label = refine(score, images[i], self.crf).argmax(0).astype(np.int32)
                    results[i] = label
        return results
