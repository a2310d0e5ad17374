"""The four pixel-to-segment relations of SPML (docs/method.md, relations), each one call of
``pixel_segment_loss``, the memory bank, and the distributed gather.

  I  low-level image similarity  same over-segmentation region, within the image
  C  semantic annotation         same class, labelled pixels and segments
  O  semantic co-occurrence      image tag sets intersect
  A  feature affinity            label sets of the most similar labelled segments intersect

Relation I is one group-mode call averaged over all non-padding pixels of the
batch (the docs allow either; it differs from the per-image average of the
release only through padding). C, O and A contrast against the current
segments of every rank plus the memory bank.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from .ops import nearest_prototype, pixel_segment_loss
from .ops.reference import pixel_segment_loss_dense
from .segments import Segments


LOSS_IMPLEMENTATIONS = {"tiled": pixel_segment_loss, "dense": pixel_segment_loss_dense}


@dataclass(frozen=True)
class RelationConfig:
    weight_image: float = 0.1          # I
    kappa_image: float = 16.0
    weight_semantic: float = 1.0       # C
    kappa_semantic: float = 6.0
    weight_cooccurrence: float = 0.5   # O
    kappa_cooccurrence: float = 12.0
    weight_affinity: float = 0.0       # A
    kappa_affinity: float = 12.0
    affinity_threshold: float = 0.95
    affinity_topk: int = 1
    memory_bank: int = 2               # batches of segments kept
    loss_impl: str = "tiled"           # "tiled" | "dense": the paper's N x M formulation (benchmarks only)

    def weights(self) -> dict:
        """{relation: weight} (``objective.term_weights`` multiplies them by ``objective.relations``)."""
        return {"I": self.weight_image, "C": self.weight_semantic, "O": self.weight_cooccurrence,
                "A": self.weight_affinity}

    def __post_init__(self):
        if self.loss_impl not in LOSS_IMPLEMENTATIONS:
            raise ValueError(f"relations.loss_impl must be one of {sorted(LOSS_IMPLEMENTATIONS)}, "
                             f"got {self.loss_impl!r}")


@dataclass
class BankSegments:
    """Segments without gradient (memory bank, other ranks)."""

    prototypes: torch.Tensor   # [M, D]
    label: torch.Tensor        # [M]
    tags: torch.Tensor         # [M, W]
    image: torch.Tensor        # [M] ids unique across batches and ranks

    @staticmethod
    def of(segments: Segments, image_ids: torch.Tensor, detach: bool = True) -> "BankSegments":
        """The segments of a batch; image_ids [B] makes their image ids unique across batches and ranks."""
        prototypes = segments.prototypes.detach() if detach else segments.prototypes
        return BankSegments(prototypes, segments.segment_label, segments.segment_tags,
                            image_ids[segments.segment_image])

    @staticmethod
    def cat(parts: list["BankSegments"]) -> "BankSegments":
        return BankSegments(*(torch.cat([getattr(p, name) for p in parts]) for name in
                              ("prototypes", "label", "tags", "image")))


class MemoryBank:
    """The segments of the last ``size`` iterations (docs/method.md, relations), state-dict serialisable."""

    def __init__(self, size: int):
        self.entries: deque = deque(maxlen=max(size, 0))

    def push(self, segments: BankSegments) -> None:
        """segments: without gradient (``BankSegments.of``); the oldest batch drops out."""
        if self.entries.maxlen:
            self.entries.append(segments)

    def segments(self) -> list[BankSegments]:
        return list(self.entries)

    def state_dict(self) -> dict:
        return {"entries": [vars(e) for e in self.entries]}

    def load_state_dict(self, state: dict) -> None:
        self.entries.clear()
        for entry in state["entries"]:
            self.entries.append(BankSegments(**entry))


def gather_segments(segments: Segments, image_ids: torch.Tensor) -> tuple[torch.Tensor, BankSegments, int]:
    """All ranks' segments: (prototypes [M_all, D] with gradient on this rank's rows,
    attributes as BankSegments, offset of this rank's rows). Without torch.distributed: this rank's."""
    local = BankSegments.of(segments, image_ids, detach=False)
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) or \
            torch.distributed.get_world_size() == 1:
        return segments.prototypes, local, 0
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    count = torch.tensor([local.prototypes.shape[0]], device=local.prototypes.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    torch.distributed.all_gather(counts, count)
    counts = [int(c) for c in counts]
    largest = max(counts)
    gathered = {}
    for name in ("prototypes", "label", "tags", "image"):
        value = getattr(local, name).detach()
        padded = torch.zeros((largest,) + value.shape[1:], dtype=value.dtype, device=value.device)
        padded[:value.shape[0]] = value
        parts = [torch.zeros_like(padded) for _ in range(world)]
        torch.distributed.all_gather(parts, padded)
        gathered[name] = [part[:n] for part, n in zip(parts, counts)]
    gathered["prototypes"][rank] = segments.prototypes          # gradients reach the local pixels
    offset = sum(counts[:rank])
    return torch.cat(gathered["prototypes"]), BankSegments(*(torch.cat(gathered[n]) for n in
                                                              ("prototypes", "label", "tags", "image"))), offset


def affinity_sets(prototypes: torch.Tensor, label: torch.Tensor, image: torch.Tensor, num_classes: int,
                  threshold: float, topk: int) -> torch.Tensor:
    """Relation A's label set of each segment: the labels of its top-k most similar labelled
    segments of the same image with cosine >= threshold; all classes when there is none. [M, W] int64."""
    words = (num_classes + 63) // 64
    all_classes = torch.zeros(words, dtype=torch.int64, device=label.device)
    for cls in range(num_classes):
        all_classes[cls // 64] |= 1 << (cls % 64)
    sets = all_classes.expand(label.shape[0], -1).clone()
    labelled = (label >= 0).nonzero()[:, 0]
    if labelled.numel() == 0:
        return sets
    k = min(topk, labelled.numel())
    neighbours, similarity = nearest_prototype(prototypes.detach(), prototypes.detach()[labelled], k,
                                               image, image[labelled])
    chosen = torch.zeros_like(sets)
    found = torch.zeros(label.shape[0], dtype=torch.bool, device=label.device)
    for j in range(k):
        ok = (neighbours[:, j] >= 0) & (similarity[:, j] >= threshold)
        cls = label[labelled[neighbours[:, j].clamp_min(0)]]
        bit = torch.zeros_like(sets)
        bit.scatter_(1, (cls // 64)[:, None], (torch.ones_like(cls) << (cls % 64))[:, None])
        chosen |= torch.where(ok[:, None], bit, torch.zeros_like(bit))
        found |= ok
    return torch.where(found[:, None], chosen, sets)


def relation_losses(segments: Segments, bank: MemoryBank, config: RelationConfig, num_classes: int,
                    image_ids: torch.Tensor) -> tuple[dict, BankSegments]:
    """{"I", "C", "O", "A"} losses (float32 scalars) for the relations with a non-zero weight, and this
    batch's segments for the memory bank. image_ids [B]: ids unique across iterations and ranks."""
    losses = {}
    loss = LOSS_IMPLEMENTATIONS[config.loss_impl]
    embeddings, segment = segments.embeddings, segments.segment
    if config.weight_image:
        losses["I"] = loss(embeddings, segments.prototypes, segment, segments.pixel_region, segments.segment_region,
                           config.kappa_image, segments.pixel_image, segments.segment_image)
    prototypes, everyone, offset = gather_segments(segments, image_ids)
    extra = bank.segments()
    if extra:
        everyone = BankSegments.cat([everyone] + extra)
        prototypes = torch.cat([prototypes] + [e.prototypes for e in extra])
    own = segment + offset
    if config.weight_semantic:
        losses["C"] = loss(embeddings, prototypes, own, segments.pixel_label, everyone.label, config.kappa_semantic)
    if config.weight_cooccurrence:
        losses["O"] = loss(embeddings, prototypes, own, segments.pixel_tags, everyone.tags, config.kappa_cooccurrence)
    if config.weight_affinity:
        sets = affinity_sets(everyone.prototypes, everyone.label, everyone.image, num_classes,
                             config.affinity_threshold, config.affinity_topk)
        losses["A"] = loss(embeddings, prototypes, own, sets[own], sets, config.kappa_affinity)
    return losses, BankSegments.of(segments, image_ids)
