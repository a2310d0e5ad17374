"""A training run on disk, and the one place that opens one.

    RUN/checkpoint.pt   model, optimiser, memory bank, iteration, epoch, position, RNG (torch.save)
    RUN/config.json     the TrainConfig (absolute paths) and the class names
    RUN/metrics.jsonl   one JSON line per logged iteration

``Run.open`` takes a run folder or its checkpoint file (``--checkpoint``)
and gives the config, the class names, the model (``weights_only`` load)
and its evaluation data (``Run.dataset``). Prediction is ``predictor``'s:
it reads k, the method and the CRF from the run's config. ``run_lock``
keeps a second ``train`` out of a folder being written; ``refuse_run_file``
keeps every output off a run's own files. Unreadable, truncated or
mismatched files are errors naming the file.
"""
from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Optional

import torch

from .config import TrainConfig, from_dict, to_dict
from .io import atomic_path, file_sha256, save_json
from .models import EmbeddingNet, LinearClassifier

CHECKPOINT = "checkpoint.pt"
CONFIG = "config.json"
METRICS = "metrics.jsonl"
LOCK = ".lock"
RUN_FILES = (CHECKPOINT, CONFIG, METRICS)


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
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
        raise RunError(f"{path}: not a run configuration ({type(error).__name__}: {error})") from None
    except ValueError as error:                    # from_dict names the file and the key
        raise RunError(str(error)) from None


@contextmanager
def run_lock(folder: str, enabled: bool = True):
    """Hold ``folder/.lock`` (an advisory ``flock``, released by the system when the process dies) while a
    run is written: a second ``train`` into the same folder is an error, never an interleaved run."""
    os.makedirs(folder, exist_ok=True)
    if not enabled:
        yield
        return
    handle = open(os.path.join(folder, LOCK), "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RunError(f"--out {folder}: {holder} is training into this run folder; wait for it to finish or "
                       "choose another --out") from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()}")
        handle.flush()
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def is_run_folder(folder: str) -> bool:
    """A folder holding any file of a run (a checkpoint, its config or its log)."""
    return any(os.path.exists(os.path.join(folder, name)) for name in RUN_FILES)


def refuse_run_file(path: str, option: str = "--out") -> None:
    """An output path that is a file of a run (its checkpoint, config or log) is an error: writing there
    would destroy the run."""
    folder, name = os.path.split(os.path.realpath(path))
    if name in RUN_FILES and is_run_folder(folder):
        raise ValueError(f"{option} {path}: that is the run's own {name} in {folder}; write elsewhere")


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

    def dataset(self, list_file: Optional[str] = None, data_root: Optional[str] = None, skip_bad: bool = False,
                num_classes: Optional[int] = None):
        """A ``SegmentationDataset`` of a list (default: the validation list) under the data root (default:
        the run's), without augmentation, checked before any work: every listed file exists and the list
        holds labels. The one constructor of evaluation data (eval, bank, classifier, demo, robustness).
        num_classes: the label range (default: the run's classes; ``bank --add`` reads binary masks)."""
        from .data import SegmentationDataset, check_entries, read_list
        root = self.data_root(data_root)
        list_file = list_file or self.config.val_list
        entries = check_entries(read_list(root, list_file, self.config.allow_outside_root), skip_bad)
        if not any(entry.label for entry in entries):
            raise ValueError(f"--list {list_file}: no entry names a label map (expected 'image label' lines)")
        return SegmentationDataset(entries, num_classes or self.num_classes, root, train=False,
                                   overseg=self.config.overseg, skip_bad=skip_bad, max_pixels=self.config.max_pixels)
