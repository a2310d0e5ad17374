"""The deployable segmenter as one module, written for export: preprocessing,
embedding network, L2 normalisation in float32, cosine against the bank,
top-k vote (or argmax, or a linear head's softmax), and resize to the input
size. Every op maps to an ONNX op TensorRT supports: the vote is Equal +
ReduceSum + ArgMax (no ScatterElements with reduction, no OneHot, no
bincount), TopK has a constant K.

Inputs: ``images`` float32 [B, 3, H, W] in [0, 1], or uint8 [B, H, W, 3]
(``uint8_input``); with ``bank_as_input`` also ``prototypes`` float32 [M, D]
(unit rows) and ``prototype_labels`` int64 [M].
Outputs: ``labels`` int32 [B, H, W] and ``scores`` float32 [B, K, H, W]
(vote shares, or class probabilities for a classifier head).

Memory: the similarity block is [B, h*w, M] float32 (h, w = H/4, W/4): a
512x512 image against an 8,192-prototype bank holds 512 MiB; keep serving
banks capped (``spml-fast bank --max-size``).
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from spml_fast.data import MEAN, STD

INPUT_NAMES = ("images", "prototypes", "prototype_labels")
OUTPUT_NAMES = ("labels", "scores")


class SegmenterGraph(nn.Module):
    def __init__(self, embedding_net: nn.Module, num_classes: int, k: int, uint8_input: bool = False,
                 bank: Optional[tuple[torch.Tensor, torch.Tensor]] = None, classifier: Optional[nn.Module] = None,
                 backbone_dtype: torch.dtype = torch.float32):
        super().__init__()
        # backbone_dtype float16: the network runs in half precision inside the graph (TensorRT's
        # strongly typed FP16 build); everything from the L2 normalisation on stays float32.
        self.backbone_dtype = backbone_dtype
        self.embedding_net = (embedding_net if backbone_dtype == torch.float32
                              else copy.deepcopy(embedding_net).to(backbone_dtype))
        self.num_classes = num_classes
        self.k = k
        self.uint8_input = uint8_input
        self.classifier = classifier
        self.register_buffer("mean", torch.tensor(MEAN, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(STD, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("class_ids", torch.arange(num_classes, dtype=torch.int64))
        self.bank_as_input = classifier is None and bank is None
        if bank is not None:
            prototypes, labels = bank
            if k > prototypes.shape[0]:
                raise ValueError(f"k = {k} exceeds the bank size {prototypes.shape[0]}")
            # stored transposed [D, M]: a plain MatMul, no transpose of a constant at run time
            self.register_buffer("prototypes_t", prototypes.float().t().contiguous())
            self.register_buffer("prototype_labels", labels.long().contiguous())

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        if self.uint8_input:
            images = images.permute(0, 3, 1, 2).float() / 255.0
        return (images - self.mean) / self.std

    def scores(self, embedding: torch.Tensor, prototypes_t: torch.Tensor, prototype_labels: torch.Tensor):
        """embedding [B, D, h, w] unit float32, prototypes_t [D, M] -> [B, K, h, w] vote shares (or softmax)."""
        if self.classifier is not None:
            return self.classifier(embedding).float().softmax(1)
        batch, dim, height, width = embedding.shape
        pixels = embedding.flatten(2).transpose(1, 2)                                  # [B, h*w, D]
        similarity = torch.matmul(pixels, prototypes_t)                               # [B, h*w, M] float32
        if self.k == 1:
            nearest = similarity.argmax(-1, keepdim=True)                             # [B, h*w, 1]
        else:
            nearest = torch.topk(similarity, self.k, dim=-1).indices                  # [B, h*w, k]
        neighbour_labels = prototype_labels.index_select(0, nearest.flatten()).view_as(nearest)   # Gather
        votes = (neighbour_labels.unsqueeze(-1) == self.class_ids).float().sum(2)     # Equal + ReduceSum
        return (votes / self.k).transpose(1, 2).reshape(batch, self.num_classes, height, width)

    def forward(self, images: torch.Tensor, prototypes: Optional[torch.Tensor] = None,
                prototype_labels: Optional[torch.Tensor] = None):
        if not self.bank_as_input and self.classifier is None:
            prototypes_t, prototype_labels = self.prototypes_t, self.prototype_labels
        else:
            prototypes_t = None if prototypes is None else prototypes.float().t()
        size = images.shape[1:3] if self.uint8_input else images.shape[2:4]
        embedding = self.embedding_net(self.preprocess(images).to(self.backbone_dtype))
        embedding = F.normalize(embedding.float(), dim=1)                             # float32, unit
        scores = self.scores(embedding, prototypes_t, prototype_labels)
        scores = F.interpolate(scores, size=size, mode="bilinear", align_corners=False)
        labels = scores.argmax(1).to(torch.int32)                                    # ArgMax
        return labels, scores
