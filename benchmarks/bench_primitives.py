"""Benchmark of the other pixel-to-segment primitives against their dense forms:
  segment-prototypes - forward + backward; dense: one-hot [N, M] matrix product
  nearest-prototype  - top-20 (k-NN); dense: [N, M] similarity + topk
  kmeans             - 10 iterations, 6x6 grid per image; dense: one-hot means + [N, C] argmax
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from spml_fast import grid_assignment, nearest_prototype, segment_prototypes, spherical_kmeans
from spml_fast.ops.reference import nearest_prototype_dense, segment_prototypes_dense

SUITE = "primitives"


def cases(quick: bool, device: str) -> list[dict]:
    scale = 1 if quick else (4 if device == "cpu" else 16)
    side = 64 if quick else 128
    pixels = 4 * side * side * (1 if quick or device == "cpu" else 4)
    return [
        dict(name=f"segment-prototypes-N{pixels}", op="segment-prototypes", N=pixels, M=1024 * scale, D=64),
        dict(name=f"nearest-prototype-k20-N{pixels}", op="nearest-prototype", N=pixels, M=1024 * scale, D=64, k=20),
        dict(name=f"kmeans-{pixels // (side * side)}x{side}x{side}", op="kmeans", B=pixels // (side * side),
             H=side, W=side, D=64, grid=6, iterations=10),
    ]


def _inputs(case, device):
    gen = torch.Generator().manual_seed(0)
    if case["op"] == "kmeans":
        pixels = case["B"] * case["H"] * case["W"]
        features = F.normalize(torch.randn(pixels, case["D"], generator=gen), dim=1).to(device)
        init, groups = grid_assignment(case["B"], case["H"], case["W"], case["grid"], case["grid"], device=device)
        return dict(features=features, init=init, groups=groups)
    embeddings = F.normalize(torch.randn(case["N"], case["D"], generator=gen), dim=1).to(device)
    prototypes = F.normalize(torch.randn(case["M"], case["D"], generator=gen), dim=1).to(device)
    segment = torch.randint(0, case["M"], (case["N"],), generator=gen).to(device)
    return dict(embeddings=embeddings, prototypes=prototypes, segment=segment)


def _dense_kmeans(features, init, groups, iterations):
    assignment, clusters = init, int(init.max()) + 1
    cluster_groups = torch.full((clusters,), -1, dtype=torch.int64, device=features.device).scatter_(0, init, groups)
    for _ in range(iterations):
        prototypes = segment_prototypes_dense(features, assignment, clusters)
        similarity = features @ prototypes.t()                                    # [N, C]
        similarity.masked_fill_(groups[:, None] != cluster_groups[None, :], float("-inf"))
        assignment = similarity.argmax(1)
    return assignment


def _step(case, device, tiled: bool):
    inputs = _inputs(case, device)
    backend = "auto" if device == "cuda" else "torch"
    if case["op"] == "segment-prototypes":
        embeddings = inputs["embeddings"].requires_grad_()
        weights = torch.randn(case["M"], case["D"], generator=torch.Generator().manual_seed(1)).to(device)
        fn = ((lambda: segment_prototypes(embeddings, inputs["segment"], case["M"], backend=backend)) if tiled
              else (lambda: segment_prototypes_dense(embeddings, inputs["segment"], case["M"])))
        return lambda: torch.autograd.grad((fn() * weights).sum(), embeddings)
    if case["op"] == "nearest-prototype":
        if tiled:
            return lambda: nearest_prototype(inputs["embeddings"], inputs["prototypes"], case["k"], backend=backend)
        return lambda: nearest_prototype_dense(inputs["embeddings"], inputs["prototypes"], case["k"])
    if tiled:
        return lambda: spherical_kmeans(inputs["features"], inputs["init"], case["iterations"], inputs["groups"],
                                        backend=backend)[0]
    return lambda: _dense_kmeans(inputs["features"], inputs["init"], inputs["groups"], case["iterations"])


IMPLEMENTATIONS = {"dense": lambda case, device: _step(case, device, tiled=False),
                   "tiled": lambda case, device: _step(case, device, tiled=True)}


def parity(case: dict, device: str) -> dict:
    dense, tiled = IMPLEMENTATIONS["dense"](case, device)(), IMPLEMENTATIONS["tiled"](case, device)()
    if case["op"] == "segment-prototypes":
        return dict(status="ok", grad_max_abs_diff=float((dense[0] - tiled[0]).abs().max()))
    if case["op"] == "nearest-prototype":
        return dict(status="ok", similarity_max_abs_diff=float((dense[1] - tiled[1]).abs().max()),
                    index_agreement=float((dense[0] == tiled[0]).float().mean()))
    return dict(status="ok", assignment_agreement=float((dense == tiled).float().mean()))
