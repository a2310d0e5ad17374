"""Evaluation: a run's predictor (``inference``, with the run's own
inference settings: ``run.Run.predictor``) against the prototype bank of
its training list (``bank``) or its class head, and mIoU from one
confusion matrix over the split with a per-class table."""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

import numpy as np
import torch

from .data import IGNORE, SegmentationDataset, check_entries, read_list
from .bank import PrototypeBank, build_run_bank, load_bank
from .inference import Head, PredictorConfig, predict_scores
from .run import Run, SpmlModel


def run_predictor(run: Run, model: SpmlModel, window: Optional[int] = None) -> PredictorConfig:
    """The run's predictor: its head's softmax when the model has one, else k-NN (k = eval_k) against a
    bank; its CRF; ``window`` for sliding windows."""
    return run.predictor(has_head=model.classifier is not None, window=window)


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


def load_for_eval(checkpoint, bank_path: Optional[str] = None, device: str = "cpu", progress: bool = True,
                  skip_bad: bool = False) -> tuple[Run, SpmlModel, Head]:
    """(run, model, head) of a run (a ``Run``, or its folder/checkpoint): the run's class head, or the
    prototype bank from ``bank_path`` (which must come from this run's checkpoint) or built from the
    run's bank/training list."""
    run = Run.of(checkpoint)
    model = run.model(device)
    if model.classifier is not None:
        return run, model, model.classifier
    head = (load_bank(bank_path, device, run=run) if bank_path
            else build_run_bank(run, device=device, progress=progress, skip_bad=skip_bad, model=model))
    return run, model, head


def run_eval(checkpoint: str, data_root: Optional[str] = None, list_file: Optional[str] = None,
             bank_path: Optional[str] = None, device: str = "cpu", window: Optional[int] = None,
             progress: bool = True, skip_bad: bool = False, loaded=None,
             options: Optional[dict] = None) -> tuple[dict, list[str]]:
    """mIoU of a run on a list (default: its validation list); ``loaded`` reuses a ``load_for_eval``
    result; ``options``: predictor fields that replace the run's (method, k, crf, scales, window).
    No image evaluated (all skipped) is an error, not a NaN."""
    run, model, head = loaded or load_for_eval(checkpoint, bank_path, device, progress, skip_bad)
    root = run.data_root(data_root)
    entries = check_entries(read_list(root, list_file or run.config.val_list, run.config.allow_outside_root),
                            skip_bad)
    val_set = SegmentationDataset(entries, run.num_classes, root, train=False, overseg=run.config.overseg,
                                  skip_bad=skip_bad)
    predictor = replace(run_predictor(run, model, window),
                        **{key: value for key, value in (options or {}).items() if value is not None})
    if predictor.method == "classifier" and model.classifier is None:
        raise ValueError("--method classifier: this run has no class head (fit one with train-classifier)")
    if predictor.method != "classifier" and not isinstance(head, PrototypeBank):
        head = load_bank(bank_path, device, run=run) if bank_path else build_run_bank(
            run, device=device, progress=progress, skip_bad=skip_bad, model=model)
    result = evaluate(model, val_set, head, run.num_classes, predictor, device, progress)
    if result["pixels"] == 0:
        raise ValueError(f"no labelled pixel was evaluated ({len(entries)} listed images, all skipped or "
                         "unlabelled): no mIoU")
    return result, run.class_names
