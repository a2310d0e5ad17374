"""Evaluation (SPEC §9, §10): the prototype bank from the training list, the
per-pixel k-NN predictor on the tiled ``nearest_prototype``, sliding windows
for large images, and mIoU from one confusion matrix over the split."""
from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .config import TrainConfig, from_dict
from .data import IGNORE, SegmentationDataset, read_list
from .ops import nearest_prototype, segment_prototypes
from .segments import cluster_embeddings, pool_labels
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


@torch.no_grad()
def build_bank(model: SpmlModel, dataset: SegmentationDataset, config: TrainConfig, num_classes: int,
               device: str = "cpu", progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Segment prototypes of the training images labelled by the majority label of their labelled
    pixels (segments without labelled pixels are left out): (prototypes [Mb, D], labels [Mb])."""
    from tqdm import tqdm
    prototypes, labels = [], []
    for index in tqdm(range(len(dataset)), desc="bank", disable=not progress, unit="image"):
        sample = dataset[index]
        if sample is None:
            continue
        embedding = model(sample["image"][None].to(device))                          # [1, D, h, w]
        _, dim, height, width = embedding.shape
        label = pool_labels(sample["label"][None].to(device), (height, width), num_classes).reshape(-1)
        grid = config.bank_grid or config.kmeans_grid      # finer clusters: purer bank prototypes
        clusters, _ = cluster_embeddings(embedding, grid, config.kmeans_iterations)
        labelled = label != IGNORE
        if not labelled.any():
            continue
        flat = embedding[0].permute(1, 2, 0).reshape(-1, dim)
        count = int(clusters.max()) + 1
        votes = torch.zeros(count, num_classes, device=device)
        votes.index_put_((clusters[labelled], label[labelled]), torch.ones(int(labelled.sum()), device=device),
                         accumulate=True)
        keep = votes.sum(1) > 0
        prototypes.append(segment_prototypes(flat, clusters, count)[keep])
        labels.append(votes.argmax(1)[keep])
    if not prototypes:
        raise ValueError("no labelled pixels in the training list: the prototype bank would be empty")
    return torch.cat(prototypes), torch.cat(labels)


@torch.no_grad()
def class_scores(model: SpmlModel, image: torch.Tensor, bank: Optional[tuple], num_classes: int, k: int,
                 window: Optional[int] = None) -> torch.Tensor:
    """image [3, H, W] -> class scores [K, H, W]: k-NN votes against the bank (or the linear
    classifier's softmax for a pce model), by sliding windows when the image exceeds ``window``."""
    height, width = image.shape[-2:]
    if window and max(height, width) > window:
        scores = torch.zeros(num_classes, height, width, device=image.device)
        stride = max(1, window * 2 // 3)
        tops = sorted({min(t, max(0, height - window)) for t in range(0, max(1, height - window + stride), stride)})
        lefts = sorted({min(t, max(0, width - window)) for t in range(0, max(1, width - window + stride), stride)})
        for top in tops:
            for left in lefts:
                crop = image[:, top:top + window, left:left + window]
                scores[:, top:top + crop.shape[1], left:left + crop.shape[2]] += class_scores(
                    model, crop, bank, num_classes, k)
        return scores
    embedding = model(image[None])
    if model.classifier is not None:
        scores = model.classifier(embedding).softmax(1)
    else:
        prototypes, labels = bank
        _, dim, h, w = embedding.shape
        k = min(k, prototypes.shape[0])
        neighbours, _ = nearest_prototype(embedding[0].permute(1, 2, 0).reshape(-1, dim), prototypes, k)
        votes = F.one_hot(labels[neighbours], num_classes).sum(1).float() / k               # [h*w, K]
        scores = votes.t().reshape(1, num_classes, h, w)
    return F.interpolate(scores, size=(height, width), mode="bilinear", align_corners=False)[0]


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
def evaluate(model: SpmlModel, dataset: SegmentationDataset, bank, num_classes: int, k: int,
             window: Optional[int] = None, device: str = "cpu", progress: bool = True) -> dict:
    from tqdm import tqdm
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    for index in tqdm(range(len(dataset)), desc="eval", disable=not progress, unit="image"):
        sample = dataset[index]
        if sample is None:
            continue
        scores = class_scores(model, sample["image"].to(device), bank, num_classes, k, window)
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
    """(model, config, class names, bank): the bank from ``bank_path`` or built from the run's
    bank/training list; None for a pce model."""
    model, config, class_names = load_run(checkpoint, device)
    num_classes = len(class_names)
    bank = None
    if model.classifier is None:
        if bank_path:
            from safetensors.torch import load_file
            stored = load_file(bank_path)
            bank = (stored["prototypes"].to(device), stored["labels"].to(device))
        else:
            train_set = SegmentationDataset(read_list(config.data_root, config.bank_list or config.train_list), num_classes,
                                            config.data_root, train=False, overseg=config.overseg, skip_bad=skip_bad)
            bank = build_bank(model, train_set, config, num_classes, device, progress)
    return model, config, class_names, bank


def run_eval(checkpoint: str, data_root: Optional[str] = None, list_file: Optional[str] = None,
             bank_path: Optional[str] = None, device: str = "cpu", window: Optional[int] = None,
             progress: bool = True, skip_bad: bool = False, loaded=None) -> tuple[dict, list[str]]:
    """mIoU of a run on a list; ``loaded`` reuses a ``load_for_eval`` result."""
    model, config, class_names, bank = loaded or load_for_eval(checkpoint, bank_path, device, progress, skip_bad)
    root = data_root or config.data_root
    num_classes = len(class_names)
    val_set = SegmentationDataset(read_list(root, list_file or config.val_list), num_classes, root, train=False,
                                  overseg=config.overseg, skip_bad=skip_bad)
    return evaluate(model, val_set, bank, num_classes, config.eval_k, window, device, progress), class_names
