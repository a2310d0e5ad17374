"""The prototype bank (docs/method.md, inference): segment prototypes of labelled images with
the majority label of their labelled pixels, saved as safetensors plus JSON
metadata, capped by class-balanced subsampling, and extended with a new class
from a few annotated images without retraining.

File layout: ``BANK.safetensors`` holds ``prototypes`` [M, D] float32 and
``labels`` [M] int64; its safetensors header carries the metadata as one JSON
string under ``spml_fast``, and ``BANK.json`` beside it repeats the metadata
for people and servers that do not read safetensors. The metadata records
the SHA-256 of the checkpoint the bank was built from: a run refuses a bank
of another checkpoint (its embeddings would not match), and every bank
refuses non-finite prototypes.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from typing import Optional

import torch

from .data import IGNORE, MEAN, STD, SegmentationDataset
from .io import atomic_path, save_json
from .ops import segment_prototypes
from .run import Run, RunError
from .segments import cluster_embeddings, pool_labels

EMBEDDING_STRIDE = 4          # the embedding map is H/4 x W/4 (models.EmbeddingNet)
METADATA_KEY = "spml_fast"
DUPLICATE_COSINE = 0.9999     # a new prototype this close to a bank prototype is the same segment again


@dataclass
class PrototypeBank:
    """prototypes [M, D] float32 unit rows; labels [M] int64 in [0, K); metadata (JSON-serialisable)."""

    prototypes: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.prototypes.dim() != 2 or self.labels.shape != (self.prototypes.shape[0],):
            raise ValueError(f"bank: prototypes must be [M, D] and labels [M], got {tuple(self.prototypes.shape)} "
                             f"and {tuple(self.labels.shape)}")
        if self.labels.numel() and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.class_names)):
            raise ValueError(f"bank: labels must lie in [0, {len(self.class_names)}) (the class names)")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def dim(self) -> int:
        return self.prototypes.shape[1]

    def to(self, device) -> "PrototypeBank":
        return replace(self, prototypes=self.prototypes.to(device), labels=self.labels.to(device))

    def counts(self) -> list[int]:
        return torch.bincount(self.labels.cpu(), minlength=self.num_classes).tolist()

    def describe(self) -> dict:
        """The metadata as saved: class names, D, preprocessing, stride, counts, and what it came from."""
        return dict(self.metadata, class_names=self.class_names, dim=self.dim, size=int(self.labels.numel()),
                    counts=self.counts(), mean=list(MEAN), std=list(STD), stride=EMBEDDING_STRIDE)


def sidecar_path(path: str) -> str:
    """The JSON metadata written beside a bank file."""
    return os.path.splitext(path)[0] + ".json"


def check_bank_output(path: str) -> None:
    """A bank's output path: not a run's own file, and not its own sidecar (``b.json`` would be written,
    then overwritten by its metadata)."""
    from .run import refuse_run_file
    refuse_run_file(path, "--out")
    refuse_run_file(sidecar_path(path), "--out (its .json sidecar)")
    if os.path.abspath(sidecar_path(path)) == os.path.abspath(path):
        raise ValueError(f"--out {path}: the bank's metadata goes to {sidecar_path(path)}, the same file; "
                         "name the bank BANK.safetensors")


def save_bank(bank: PrototypeBank, path: str) -> None:
    """Write ``path`` (safetensors) and ``<path without extension>.json`` atomically."""
    from safetensors.torch import save_file
    check_bank_output(path)
    metadata = bank.describe()
    tensors = {"prototypes": bank.prototypes.detach().float().cpu().contiguous(),
               "labels": bank.labels.detach().long().cpu().contiguous()}
    with atomic_path(path) as temp:
        save_file(tensors, temp, metadata={METADATA_KEY: json.dumps(metadata)})
    save_json(sidecar_path(path), metadata)


def load_bank(path: str, device="cpu", run: Optional[Run] = None) -> PrototypeBank:
    """Read a bank written by ``save_bank``; errors name the file. With ``run``: the bank must have been
    built from that run's checkpoint (the SHA-256 in its metadata) and match its classes and D."""
    from safetensors import safe_open
    if not os.path.exists(path):
        raise ValueError(f"--bank {path}: no such file")
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = json.loads((handle.metadata() or {}).get(METADATA_KEY, "{}"))
            prototypes, labels = handle.get_tensor("prototypes"), handle.get_tensor("labels")
    except Exception as error:  # not safetensors, missing tensors, bad JSON: all "not a bank"
        raise ValueError(f"--bank {path}: not a prototype bank ({type(error).__name__}: {error})") from None
    if prototypes.dim() != 2 or prototypes.shape[0] == 0:
        raise ValueError(f"--bank {path}: prototypes must be a non-empty [M, D] matrix, got {tuple(prototypes.shape)}")
    bad_rows = (~torch.isfinite(prototypes.float())).any(1)
    if bool(bad_rows.any()):
        raise ValueError(f"--bank {path}: {int(bad_rows.sum())} of {prototypes.shape[0]} prototypes hold NaN or "
                         "infinite values")
    class_names = metadata.pop("class_names", None) or [str(i) for i in range(int(labels.max()) + 1)]
    for derived in ("dim", "size", "counts", "mean", "std", "stride"):
        metadata.pop(derived, None)
    bank = PrototypeBank(prototypes.float(), labels.long(), class_names, metadata).to(device)
    if run is not None:
        check_bank_matches(bank, run, path)
    return bank


def check_bank_matches(bank: PrototypeBank, run: Run, path: str) -> None:
    """The bank was built from ``run``'s checkpoint and names its classes."""
    recorded = bank.metadata.get("checkpoint_sha256")
    if recorded is None:
        raise RunError(f"--bank {path}: records no checkpoint (not written by spml-fast bank); rebuild it with "
                       f"spml-fast bank --checkpoint {run.folder}")
    if recorded != run.checkpoint_sha256():
        raise RunError(f"--bank {path} was built from another checkpoint ({bank.metadata.get('checkpoint', '?')}, "
                       f"SHA-256 {recorded[:12]}...) than {run.checkpoint}: rebuild it with "
                       f"spml-fast bank --checkpoint {run.folder}")
    if bank.class_names[:run.num_classes] != list(run.class_names):
        raise RunError(f"--bank {path}: its classes {bank.class_names} are not the run's {run.class_names}")


@torch.no_grad()
def labelled_segment_prototypes(model, dataset: SegmentationDataset, grid: int, iterations: int,
                                num_classes: int, device="cpu", progress: bool = True,
                                desc: str = "bank") -> tuple[torch.Tensor, torch.Tensor]:
    """SegSort segments of each image (k-means on a grid x grid start) that hold labelled pixels:
    (prototypes [Mb, D] float32, majority labels [Mb] int64). Unlabelled segments are left out."""
    from tqdm import tqdm
    prototypes, labels = [], []
    for index in tqdm(range(len(dataset)), desc=desc, disable=not progress, unit="image"):
        sample = dataset[index]
        if sample is None:
            continue
        embedding = model(sample["image"][None].to(device))                          # [1, D, h, w]
        _, dim, height, width = embedding.shape
        label = pool_labels(sample["label"][None].to(device), (height, width), num_classes).reshape(-1)
        labelled = label != IGNORE
        if not labelled.any():
            continue
        clusters, _ = cluster_embeddings(embedding, grid, iterations)
        count = int(clusters.max()) + 1
        votes = torch.zeros(count, num_classes, device=device)
        votes.index_put_((clusters[labelled], label[labelled]), torch.ones(int(labelled.sum()), device=device),
                         accumulate=True)
        keep = votes.sum(1) > 0
        flat = embedding[0].permute(1, 2, 0).reshape(-1, dim)
        prototypes.append(segment_prototypes(flat, clusters, count)[keep])
        labels.append(votes.argmax(1)[keep])
    if not prototypes:
        raise ValueError("no labelled pixels in the list: the prototype bank would be empty")
    return torch.cat(prototypes), torch.cat(labels)


def subsample_balanced(bank: PrototypeBank, cap: int, seed: int = 0) -> PrototypeBank:
    """At most ``cap`` prototypes, shared equally among the classes present (a class with fewer
    keeps all of its own and leaves the rest to the others); a seeded random choice within a class."""
    if cap < 1:
        raise ValueError(f"--max-size must be >= 1, got {cap}")
    size = bank.labels.numel()
    if size <= cap:
        return bank
    counts = torch.bincount(bank.labels.cpu(), minlength=bank.num_classes)
    quota = torch.zeros_like(counts)
    remaining, open_classes = cap, (counts > 0).nonzero()[:, 0].tolist()
    while remaining > 0 and open_classes:            # water-filling: equal shares, capped by what a class has
        share = max(1, remaining // len(open_classes))
        for cls in list(open_classes):
            take = min(share, int(counts[cls] - quota[cls]), remaining)
            quota[cls] += take
            remaining -= take
            if quota[cls] == counts[cls]:
                open_classes.remove(cls)
            if remaining == 0:
                break
    generator = torch.Generator().manual_seed(seed)
    keep = []
    labels = bank.labels.cpu()
    for cls in range(bank.num_classes):
        members = (labels == cls).nonzero()[:, 0]
        keep.append(members[torch.randperm(members.numel(), generator=generator)[:int(quota[cls])]])
    keep = torch.sort(torch.cat(keep)).values.to(bank.labels.device)
    return replace(bank, prototypes=bank.prototypes[keep], labels=bank.labels[keep],
                   metadata=dict(bank.metadata, subsampled_from=int(size)))


def add_class(bank: PrototypeBank, name: str, prototypes: torch.Tensor, labels: torch.Tensor) -> PrototypeBank:
    """A new class from the segments of a few annotated images (label 1 = the new class, 0 = other):
    segments voted 1 join the bank as class ``name``; nothing is retrained."""
    if name in bank.class_names:
        raise ValueError(f"--add {name!r}: the bank already has that class")
    new = prototypes[labels == 1]
    if new.shape[0] == 0:
        raise ValueError(f"--add {name!r}: no segment of the given images is labelled 1 (the new class)")
    if new.shape[1] != bank.dim:
        raise ValueError(f"--add {name!r}: embeddings have D = {new.shape[1]}, the bank D = {bank.dim}")
    if bank.labels.numel():
        nearest = (new.to(bank.prototypes) @ bank.prototypes.t()).max(1)
        duplicate = nearest.values >= DUPLICATE_COSINE
        if bool(duplicate.any()):
            classes = sorted({bank.class_names[int(c)] for c in bank.labels[nearest.indices[duplicate]]})
            raise ValueError(f"--add {name!r}: {int(duplicate.sum())} of {new.shape[0]} new segments are already in "
                             f"the bank (as {', '.join(classes)}): the images were used to build it. Use images "
                             "the bank was not built from")
    index = len(bank.class_names)
    added = torch.full((new.shape[0],), index, dtype=torch.int64, device=bank.labels.device)
    return PrototypeBank(torch.cat([bank.prototypes, new.to(bank.prototypes)]), torch.cat([bank.labels, added]),
                         bank.class_names + [name], dict(bank.metadata, added=bank.metadata.get("added", []) + [name]))


def build_run_bank(checkpoint, data_root: Optional[str] = None, list_file: Optional[str] = None,
                   device="cpu", max_size: Optional[int] = None, progress: bool = True,
                   skip_bad: bool = False, model=None) -> PrototypeBank:
    """The bank of a training run (a ``Run`` or its folder/checkpoint) from a list (default: the run's
    bank or training list); ``model``: the run's model when already loaded."""
    run = Run.of(checkpoint)
    model = model if model is not None else run.model(device)
    source = list_file or run.config.labelled_list
    dataset = run.dataset(source, data_root, skip_bad)
    prototypes, labels = labelled_segment_prototypes(model, dataset, run.config.segment_grid,
                                                     run.config.kmeans_iterations, run.num_classes, device, progress)
    metadata = dict(checkpoint=run.checkpoint, checkpoint_sha256=run.checkpoint_sha256(), source_list=source,
                    source_images=len(dataset), preset=run.config.preset)
    bank = PrototypeBank(prototypes, labels, list(run.class_names), metadata)
    return subsample_balanced(bank, max_size) if max_size else bank


def add_class_from_list(checkpoint, bank_path: str, name: str, data_root: Optional[str], list_file: str,
                        device="cpu", max_size: Optional[int] = None, progress: bool = True) -> PrototypeBank:
    """``spml-fast bank --add``: the run's segments of the list's images, with binary masks as labels
    (1 = the new class), join the bank at ``bank_path`` (built from this run) as class ``name``."""
    if not name or not name.strip():
        raise ValueError("--add: the new class needs a name")
    run = Run.of(checkpoint)
    bank = load_bank(bank_path, device, run=run)
    masks = run.dataset(list_file, data_root, num_classes=2)
    prototypes, labels = labelled_segment_prototypes(run.model(device), masks, run.config.segment_grid,
                                                     run.config.kmeans_iterations, 2, device, progress, desc="add")
    bank = add_class(bank, name, prototypes, labels)
    return subsample_balanced(bank, max_size) if max_size else bank
