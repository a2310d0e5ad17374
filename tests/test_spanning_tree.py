"""The spanning trees the tree-energy term filters along: minimum (against
Kruskal, with ties), spanning, rooted, ordered top-down, and the same from
every entry point (torch distances, the numpy ``feature_tree``) and both
builders (scipy on the host, the Triton kernels through the interpreter)."""
import numpy as np
import pytest
import torch

from conftest import NEEDS_TRITON, TRITON_ON_CPU

from spml_fast.ops.spanning_tree import (CUT, edge_distances, feature_tree, grid_edges, parent_affinity,
                                         spanning_forest, tree_weight)


def kruskal_weight(weights: np.ndarray, height: int, width: int) -> float:
    """Total weight of a minimum spanning tree of the grid, by Kruskal with union-find (float64, sorted)."""
    first, second = grid_edges(height, width)
    parent = list(range(height * width))

    def root(node):
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node
    chosen = []
    for edge in np.argsort(weights, kind="stable"):
        a, b = root(first[edge]), root(second[edge])
        if a != b:
            parent[a] = b
            chosen.append(float(weights[edge]))
    return float(np.sum(np.sort(np.array(chosen, dtype=np.float64))))


def check_rooted_order(forest, nodes: int) -> None:
    for parent, order in zip(forest.parent.tolist(), forest.order.tolist()):
        assert sorted(order) == list(range(nodes))                         # every pixel once
        assert order[0] == 0 and parent[0] == 0                            # rooted at pixel 0
        position = {node: k for k, node in enumerate(order)}
        assert all(position[parent[node]] < position[node] for node in range(1, nodes))   # parents first
        assert sum(parent[node] == node for node in range(nodes)) == 1     # one root: a tree


@pytest.mark.parametrize("height,width", [(1, 1), (1, 7), (8, 8), (13, 9), (32, 32), (128, 128)])
def test_spanning_forest_is_minimum_with_ties(height, width):
    gen = torch.Generator().manual_seed(height * 1000 + width)
    edges = height * (width - 1) + (height - 1) * width
    # integer weights: many ties (and zeros, which scipy would drop without the offset)
    distances = torch.randint(0, 4, (2, edges), generator=gen).float()
    forest = spanning_forest(distances, height, width)
    check_rooted_order(forest, height * width)
    for image, total in enumerate(tree_weight(forest, distances, height, width)):
        assert total == kruskal_weight(distances[image].numpy(), height, width)


def test_feature_tree_is_the_tree_of_the_edge_distances():
    gen = torch.Generator().manual_seed(0)
    features = torch.rand(2, 3, 9, 11, generator=gen)
    valid = torch.ones(2, 9, 11, dtype=torch.bool)
    valid[1, :, 8:] = False                                               # padding: cut edges
    forest, affinity = feature_tree(features, valid, sigma=0.2)
    distances = edge_distances(features, valid)
    reference = spanning_forest(distances, 9, 11)
    assert tree_weight(forest, distances, 9, 11) == pytest.approx(tree_weight(reference, distances, 9, 11), rel=1e-6)
    torch.testing.assert_close(affinity, parent_affinity(features, forest, 0.2))
    assert float(affinity[:, 0]) == 0.0 if affinity.shape[0] == 1 else bool((affinity[:, 0] == 0).all())
    # exactly one edge crosses into the padded block, with affinity exp(-CUT / sigma) = 0
    first, second = grid_edges(9, 11)
    crossing = [float(distances[1, e]) for e in range(len(first)) if valid[1].flatten()[first[e]] != valid[1].flatten()[second[e]]]
    assert crossing and all(d == CUT for d in crossing)
    check_rooted_order(forest, 99)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="distances"):
        spanning_forest(torch.zeros(1, 5), 3, 3)
    with pytest.raises(ValueError, match="valid"):
        feature_tree(torch.zeros(1, 3, 4, 4), torch.ones(1, 4, 5, dtype=torch.bool), 0.1)


DEVICE = "cpu" if TRITON_ON_CPU else "cuda"


@NEEDS_TRITON
@pytest.mark.parametrize("height,width,batch,ties", [(1, 1, 2, True), (1, 7, 2, True), (7, 1, 2, True),
                                                     (8, 8, 3, True), (13, 9, 2, True), (32, 32, 2, True),
                                                     (40, 24, 2, False), (128, 128, 1, True)])
def test_device_forest_equals_scipy_weight_exactly(height, width, batch, ties):
    gen = torch.Generator().manual_seed(height * 1000 + width)
    edges = height * (width - 1) + (height - 1) * width
    distances = (torch.randint(0, 4, (batch, edges), generator=gen).float() if ties
                 else torch.rand(batch, edges, generator=gen))
    forest = spanning_forest(distances.to(DEVICE), height, width, backend="triton").to("cpu")
    check_rooted_order(forest, height * width)
    host = spanning_forest(distances, height, width, backend="host")
    assert tree_weight(forest, distances, height, width) == tree_weight(host, distances, height, width)


@NEEDS_TRITON
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_device_feature_tree_matches_the_host_one(dtype):
    gen = torch.Generator().manual_seed(7)
    features = torch.rand(2, 5, 12, 10, generator=gen).to(dtype)
    valid = torch.ones(2, 12, 10, dtype=torch.bool)
    valid[0, 9:] = False
    forest, affinity = feature_tree(features.to(DEVICE), valid.to(DEVICE), 0.3, backend="triton")
    forest, affinity = forest.to("cpu"), affinity.cpu()
    check_rooted_order(forest, 120)
    distances = edge_distances(features, valid)
    host_forest, _ = feature_tree(features, valid, 0.3, backend="host")
    assert tree_weight(forest, distances, 12, 10) == pytest.approx(tree_weight(host_forest, distances, 12, 10),
                                                                    rel=1e-6)
    torch.testing.assert_close(affinity, parent_affinity(features, forest, 0.3), rtol=1e-5, atol=1e-6)
