"""A softmax classifier head on frozen SPML embeddings (``spml-fast
train-classifier``): a 1x1 convolution D -> K fit by cross-entropy on the
labelled pixels of a list (partial labels are enough), the embedding network
untouched. Saved as safetensors (``classifier.weight`` [K, D, 1, 1],
``classifier.bias`` [K]) with the class names in the header.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import IGNORE, SegmentationDataset
from .io import atomic_path
from .models import LinearClassifier
from .segments import pool_labels

METADATA_KEY = "spml_fast"


@dataclass(frozen=True)
class ClassifierConfig:
    epochs: int = 200                 # full-batch passes over the collected pixels
    lr: float = 0.05
    weight_decay: float = 1e-4
    max_pixels: int = 200_000         # labelled pixels kept (a seeded random subset beyond that)
    seed: int = 0


@torch.no_grad()
def labelled_embeddings(model, dataset: SegmentationDataset, num_classes: int, device="cpu",
                        progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings [P, D] float32 and labels [P] int64 of the labelled pixels (at embedding resolution)."""
    from tqdm import tqdm
    features, labels = [], []
    for index in tqdm(range(len(dataset)), desc="embeddings", disable=not progress, unit="image"):
        sample = dataset[index]
        if sample is None:
            continue
        embedding = model(sample["image"][None].to(device))
        dim, height, width = embedding.shape[1:]
        label = pool_labels(sample["label"][None].to(device), (height, width), num_classes).reshape(-1)
        keep = label != IGNORE
        features.append(embedding[0].permute(1, 2, 0).reshape(-1, dim)[keep])
        labels.append(label[keep])
    if not features or sum(f.shape[0] for f in features) == 0:
        raise ValueError("no labelled pixels in the list: nothing to fit the classifier on")
    return torch.cat(features), torch.cat(labels)


def fit_classifier(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                   config: ClassifierConfig = ClassifierConfig(), progress: bool = True) -> LinearClassifier:
    """Full-batch Adam on cross-entropy, classes weighted by inverse frequency (scribbles are unbalanced)."""
    from tqdm import tqdm
    generator = torch.Generator().manual_seed(config.seed)
    if features.shape[0] > config.max_pixels:
        keep = torch.randperm(features.shape[0], generator=generator)[:config.max_pixels].to(features.device)
        features, labels = features[keep], labels[keep]
    torch.manual_seed(config.seed)
    head = LinearClassifier(features.shape[1], num_classes).to(features.device)
    counts = torch.bincount(labels, minlength=num_classes).float()
    weight = torch.where(counts > 0, counts.sum() / (num_classes * counts.clamp(min=1)), torch.zeros_like(counts))
    optimiser = torch.optim.Adam(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    inputs = features[:, :, None, None]
    bar = tqdm(range(config.epochs), desc="classifier", disable=not progress)
    for _ in bar:
        loss = F.cross_entropy(head(inputs)[:, :, 0, 0], labels, weight=weight)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return head.eval()


def save_classifier(head: LinearClassifier, class_names: list[str], path: str, metadata: dict = None) -> None:
    from safetensors.torch import save_file
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in head.folded().state_dict().items()}
    info = dict(metadata or {}, class_names=class_names, kind="linear-classifier")
    with atomic_path(path) as temp:
        save_file(tensors, temp, metadata={METADATA_KEY: json.dumps(info)})


def load_classifier(path: str, device="cpu") -> tuple[LinearClassifier, list[str], dict]:
    """(head, class names, metadata) of a file written by ``save_classifier``; errors name the file."""
    from safetensors import safe_open
    if not os.path.exists(path):
        raise ValueError(f"--classifier {path}: no such file")
    try:
        with safe_open(path, framework="pt") as handle:
            info = json.loads((handle.metadata() or {}).get(METADATA_KEY, "{}"))
            state = {key: handle.get_tensor(key) for key in handle.keys()}
        weight = state["classifier.weight"]
    except Exception as error:  # not safetensors, no weight: "not a classifier"
        raise ValueError(f"--classifier {path}: not a classifier head ({type(error).__name__}: {error})") from None
    head = LinearClassifier(weight.shape[1], weight.shape[0])
    head.load_state_dict(state)
    names = info.pop("class_names", None) or [str(i) for i in range(weight.shape[0])]
    return head.to(device).eval(), names, info


def train_classifier_for_run(checkpoint: str, out: str, data_root: str = None, list_file: str = None,
                             config: ClassifierConfig = ClassifierConfig(), device="cpu",
                             progress: bool = True) -> dict:
    """Fit and save a head for a run on a list (default: the run's bank or training list)."""
    from .run import Run, refuse_run_file
    run = Run.of(checkpoint)
    refuse_run_file(out, "--out")
    model = run.model(device)
    dataset = run.dataset(list_file or run.config.labelled_list, data_root)
    features, labels = labelled_embeddings(model, dataset, run.num_classes, device, progress)
    head = fit_classifier(features, labels, run.num_classes, config, progress)
    accuracy = float((head(features[:, :, None, None])[:, :, 0, 0].argmax(1) == labels).float().mean())
    save_classifier(head, run.class_names, out, dict(checkpoint=run.checkpoint,
                                                     checkpoint_sha256=run.checkpoint_sha256(),
                                                     pixels=int(labels.numel())))
    return dict(pixels=int(labels.numel()), train_accuracy=accuracy, out=out)
