"""Evaluation: a run's predictor (``predictor.open_predictor``: the run's own settings unless told
otherwise) on a labelled list, and mIoU from one confusion matrix over the split with a per-class
table."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .data import IGNORE, SegmentationDataset
from .predictor import Predictor, open_predictor


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
def evaluate(predictor: Predictor, dataset: SegmentationDataset, progress: bool = True) -> dict:
    """mIoU of ``predictor`` on ``dataset``: {mIoU, per_class, pixels, images}."""
    from tqdm import tqdm
    num_classes = len(predictor.class_names)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    images = 0
    for index in tqdm(range(len(dataset)), desc="eval", disable=not progress, unit="image"):
        sample = dataset[index]
        if sample is None:
            continue
        prediction = predictor.scores(sample["image"][None])[0].argmax(0).cpu().numpy()
        confusion += confusion_matrix(prediction, sample["label"].numpy(), num_classes)
        images += 1
    mean, per_class = miou(confusion)
    return dict(mIoU=mean, per_class=per_class, pixels=int(confusion.sum()), images=images)


def format_table(result: dict, class_names: list[str]) -> str:
    lines = ["| class | IoU |", "|---|---|"]
    for name, value in zip(class_names, result["per_class"]):
        lines.append(f"| {name} | {'-' if value is None else f'{value:.3f}'} |")
    lines.append(f"| **mean** | **{result['mIoU']:.3f}** |")
    return "\n".join(lines)


def run_eval(checkpoint, data_root: Optional[str] = None, list_file: Optional[str] = None,
             bank: Optional[str] = None, device: str = "cpu", progress: bool = True, skip_bad: bool = False,
             predictor: Optional[Predictor] = None, **overrides) -> tuple[dict, list[str]]:
    """mIoU of a run on a list (default: its validation list), with what was measured: the list, the
    image count, the method, k and the CRF. ``predictor`` reuses an opened one; ``overrides``: the
    settings given explicitly (``predictor.OVERRIDES``). No labelled pixel evaluated is an error."""
    predictor = predictor or open_predictor(checkpoint, bank, device=device, build_bank=True, data_root=data_root,
                                            progress=progress, skip_bad=skip_bad, **overrides)
    run = predictor.run
    list_file = list_file or run.config.val_list
    result = evaluate(predictor, run.dataset(list_file, data_root, skip_bad), progress)
    if result["pixels"] == 0:
        raise ValueError(f"no labelled pixel was evaluated ({list_file}: all images skipped or unlabelled): "
                         "no mIoU")
    result.update(list=list_file, data_root=run.data_root(data_root), **predictor.describe())
    return result, run.class_names
