"""Evaluation (SPEC §10): a run's predictor (``inference``) against the
prototype bank of its training list (``bank``), and mIoU from one confusion
matrix over the split with a per-class table."""
from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np
import torch

from .config import TrainConfig, from_dict
from .data import IGNORE, SegmentationDataset, read_list
from .inference import Head, PredictorConfig, predict_scores
from .train import CHECKPOINT, SpmlModel, load_checkpoint


def load_run(checkpoint: str, device: str = "cpu") -> tuple[SpmlModel, TrainConfig, list[str]]:
    """A run folder (or its checkpoint file) -> (model in eval mode, config, class names)."""
    folder = checkpoint if os.path.isdir(checkpoint) else os.path.dirname(checkpoint)
    path = os.path.join(checkpoint, CHECKPOINT) if os.path.isdir(checkpoint) else checkpoint
    config_path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        raise ValueError(f"--checkpoint: no checkpoint at {path}")
    if not os.path.exists(config_path):
        raise ValueError(f"--checkpoint: no config.json beside {path}")
    with open(config_path) as handle:
        data = json.load(handle)
    class_names = data.pop("class_names")
    config = from_dict(data)
    model = SpmlModel(config, len(class_names))
    model.load_state_dict(load_checkpoint(path)["model"])
    return model.to(device).eval(), config, class_names


def run_predictor(config: TrainConfig, model: SpmlModel, window: Optional[int] = None) -> PredictorConfig:
    """The run's evaluation predictor: the pce head's softmax, or k-NN (k = eval_k) against a bank."""
    method = "classifier" if model.classifier is not None else "pixel-knn"
    return PredictorConfig(method=method, k=config.eval_k, window=window, crf=config.crf)


def class_scores(model: SpmlModel, image: torch.Tensor, head: Head, predictor: PredictorConfig) -> torch.Tensor:
    """image [3, H, W] normalised -> class scores [K, H, W] (see ``inference.predict_scores``)."""
    return predict_scores(model, image[None], head, predictor)[0]


def confusion_matrix(prediction: np.ndarray, truth: np.ndarray, num_classes: int) -> np.ndarray:
    keep = truth != IGNORE
    return np.bincount(truth[keep].astype(np.int64) * num_classes + prediction[keep],
                       minlength=num_classes ** 2).reshape(num_classes, num_classes)


def miou(confusion: np.ndarray) -> tuple[float, list[float]]:
    """IoU per class = TP / (TP + FP + FN); mean over classes present in truth or prediction."""
    tp = np.diag(confusion).astype(float)
    union = confusion.sum(0) + confusion.sum(1) - tp
    iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    return float(np.nanmean(iou)), [None if np.isnan(v) else float(v) for v in iou]


@torch.no_grad()
def evaluate(model: SpmlModel, dataset: SegmentationDataset, head: Head, num_classes: int,
             predictor: PredictorConfig, device: str = "cpu", progress: bool = True) -> dict:
    from tqdm import tqdm
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    for index in tqdm(range(len(dataset)), desc="eval", disable=not progress, unit="image"):
        sample = dataset[index]
        if sample is None:
            continue
        scores = class_scores(model, sample["image"].to(device), head, predictor)
        prediction = scores.argmax(0).cpu().numpy()
        confusion += confusion_matrix(prediction, sample["label"].numpy(), num_classes)
    mean, per_class = miou(confusion)
    return dict(mIoU=mean, per_class=per_class, pixels=int(confusion.sum()))


def format_table(result: dict, class_names: list[str]) -> str:
    lines = ["| class | IoU |", "|---|---|"]
    for name, value in zip(class_names, result["per_class"]):
        lines.append(f"| {name} | {'-' if value is None else f'{value:.3f}'} |")
    lines.append(f"| **mean** | **{result['mIoU']:.3f}** |")
    return "\n".join(lines)


def load_for_eval(checkpoint: str, bank_path: Optional[str] = None, device: str = "cpu", progress: bool = True,
                  skip_bad: bool = False):
    """(model, config, class names, head): the pce run's classifier, or the prototype bank from
    ``bank_path`` or built from the run's bank/training list."""
    from .bank import build_run_bank, load_bank
    model, config, class_names = load_run(checkpoint, device)
    if model.classifier is not None:
        return model, config, class_names, model.classifier
    if bank_path:
        head = load_bank(bank_path, device)
        if head.class_names[:len(class_names)] != list(class_names):
            raise ValueError(f"--bank {bank_path}: its classes {head.class_names} are not the run's {class_names}")
    else:
        head = build_run_bank(checkpoint, device=device, progress=progress, skip_bad=skip_bad,
                              loaded_run=(model, config, class_names))
    return model, config, class_names, head


def run_eval(checkpoint: str, data_root: Optional[str] = None, list_file: Optional[str] = None,
             bank_path: Optional[str] = None, device: str = "cpu", window: Optional[int] = None,
             progress: bool = True, skip_bad: bool = False, loaded=None) -> tuple[dict, list[str]]:
    """mIoU of a run on a list; ``loaded`` reuses a ``load_for_eval`` result."""
    model, config, class_names, head = loaded or load_for_eval(checkpoint, bank_path, device, progress, skip_bad)
    root = data_root or config.data_root
    num_classes = len(class_names)
    val_set = SegmentationDataset(read_list(root, list_file or config.val_list), num_classes, root, train=False,
                                  overseg=config.overseg, skip_bad=skip_bad)
    return evaluate(model, val_set, head, num_classes, run_predictor(config, model, window), device,
                    progress), class_names
