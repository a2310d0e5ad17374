"""A training run on disk, and the one place that opens one.

    RUN/checkpoint.pt   model, optimiser, memory bank, iteration, epoch, position, RNG (torch.save)
    RUN/config.json     the TrainConfig (absolute paths) and the class names
    RUN/metrics.jsonl   one JSON line per logged iteration

``Run.open`` takes a run folder or its checkpoint file (``--checkpoint``)
and gives the config, the class names, the model (``weights_only`` load)
and the run's inference settings: every command that predicts (``eval``,
``bank``, ``export``, ``predict``) takes k, the method and the CRF from
here unless told otherwise, so they all reproduce the evaluated numbers.
Unreadable, truncated or mismatched files are errors naming the file.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, replace
from typing import Optional

import torch

from .config import TrainConfig, from_dict, to_dict
from .io import atomic_path, save_json
from .models import EmbeddingNet, LinearClassifier

CHECKPOINT = "checkpoint.pt"
CONFIG = "config.json"


class RunError(ValueError):
    """A run folder, checkpoint or config that cannot be used; the message names the file."""


class SpmlModel(torch.nn.Module):
    """Embedding network, plus a class head when the objective has head terms (``objective``)."""

    def __init__(self, config: TrainConfig, num_classes: int):
        super().__init__()
        self.embedding = EmbeddingNet(config.model)
        self.embedding.checkpoint_backbone = config.checkpoint_backbone
        self.classifier = (LinearClassifier(config.model.embedding_dim, num_classes, config.objective.head_scale)
                           if config.objective.has_head else None)

    def forward(self, images):
        return self.embedding(images)


def save_checkpoint(path: str, state: dict) -> None:
    """Atomic: a failed write (disk full, a kill) leaves the previous checkpoint byte-identical."""
    try:
        with atomic_path(path) as temp:
            torch.save(state, temp)
    except (OSError, RuntimeError) as error:        # torch reports a full disk as RuntimeError
        raise RunError(f"cannot write checkpoint {path} ({type(error).__name__}: {error}); "
                       "the previous checkpoint, if any, is intact") from None


def load_checkpoint(path: str) -> dict:
    """A checkpoint written by ``save_checkpoint`` (``weights_only``); errors name the file."""
    if not os.path.isfile(path):
        raise RunError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, not a zip, unsafe pickle: all "not a checkpoint"
        raise RunError(f"{path} is not a readable checkpoint ({type(error).__name__}: "
                       f"{str(error).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise RunError(f"{path} is not a spml_fast checkpoint (no model state)")
    return state


def write_config(folder: str, config: TrainConfig, class_names: list[str]) -> None:
    save_json(os.path.join(folder, CONFIG), dict(to_dict(config), class_names=list(class_names)))


def read_config(folder: str) -> tuple[TrainConfig, list[str]]:
    path = os.path.join(folder, CONFIG)
    if not os.path.isfile(path):
        raise RunError(f"no {CONFIG} in {folder}")
    try:
        with open(path) as handle:
            data = json.load(handle)
        class_names = data.pop("class_names")
        return from_dict(data, where=path), list(class_names)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise RunError(f"{path}: not a run configuration ({type(error).__name__}: {error})") from None


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Run:
    folder: str                  # absolute
    config: TrainConfig
    class_names: list

    @staticmethod
    def open(path: str, argument: str = "--checkpoint") -> "Run":
        """A run folder, or the checkpoint file inside one."""
        if not path or not os.path.exists(path):
            raise RunError(f"{argument} {path}: no such run folder or checkpoint")
        folder = os.path.abspath(path if os.path.isdir(path) else os.path.dirname(path))
        if not os.path.isfile(os.path.join(folder, CHECKPOINT)):
            raise RunError(f"{argument} {path}: no {CHECKPOINT} in {folder} (has the run saved a checkpoint?)")
        config, class_names = read_config(folder)
        return Run(folder, config, class_names)

    def with_settings(self, **changes) -> "Run":
        """The same run with some TrainConfig settings changed for this process (allow_outside_root, ...)."""
        return replace(self, config=replace(self.config, **changes))

    @staticmethod
    def of(run_or_path, argument: str = "--checkpoint") -> "Run":
        return run_or_path if isinstance(run_or_path, Run) else Run.open(run_or_path, argument)

    @property
    def checkpoint(self) -> str:
        return os.path.join(self.folder, CHECKPOINT)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def checkpoint_sha256(self) -> str:
        return file_sha256(self.checkpoint)

    def model(self, device="cpu") -> SpmlModel:
        """The trained model, in eval mode."""
        model = SpmlModel(self.config, self.num_classes)
        state = load_checkpoint(self.checkpoint)["model"]
        try:
            model.load_state_dict(state)
        except RuntimeError as error:
            raise RunError(f"{self.checkpoint} does not match {os.path.join(self.folder, CONFIG)} "
                           f"(another preset or model size?): {str(error).splitlines()[0]}") from None
        return model.to(device).eval()

    def data_root(self, override: Optional[str] = None) -> str:
        return override or self.config.data_root

    def predictor(self, has_head: Optional[bool] = None, **overrides):
        """The run's inference settings (``inference.PredictorConfig``): its head's softmax when it has one,
        else k-NN against a bank with k = ``eval_k``; its CRF. ``overrides``: fields set explicitly."""
        from .inference import PredictorConfig
        has_head = self.config.objective.has_head if has_head is None else has_head
        base = PredictorConfig(method="classifier" if has_head else "pixel-knn", k=self.config.eval_k,
                               crf=self.config.crf)
        return replace(base, **{key: value for key, value in overrides.items() if value is not None})
