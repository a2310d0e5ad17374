"""The tree filter: the host path (sparse triangular solves) and the Triton
kernel (one program per image and block of channels, under the interpreter
here) against the level-by-level reference, and the reference against the
definition (sums of path products)."""
import pytest
import torch

from conftest import NEEDS_TRITON, TRITON_ON_CPU
from spml_fast.ops.spanning_tree import edge_distances, feature_tree, spanning_forest
from spml_fast.ops.tree_filter import depths, tree_filter, tree_filter_reference


def problem(batch, height, width, channels, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    features = torch.rand(batch, 3, height, width, generator=gen)
    valid = torch.ones(batch, height, width, dtype=torch.bool)
    valid[-1, :, width - 2:] = False
    forest, affinity = feature_tree(features, valid, sigma=0.3)
    values = torch.rand(batch, height * width, channels, generator=gen).to(dtype)
    return values, forest, affinity


def test_reference_matches_path_products():
    """filtered_i = sum_j A(i, j) v_j / sum_j A(i, j), A the product of edge affinities on the tree path."""
    gen = torch.Generator().manual_seed(1)
    height, width = 4, 5
    nodes = height * width
    features = torch.rand(1, 2, height, width, generator=gen)
    forest = spanning_forest(edge_distances(features, torch.ones(1, height, width, dtype=torch.bool)), height, width)
    affinity = torch.rand(1, nodes, generator=gen) * 0.9 + 0.05
    values = torch.rand(1, nodes, 3, generator=gen)
    parent = forest.parent[0].tolist()
    neighbours = {i: [] for i in range(nodes)}
    for child in range(nodes):
        if parent[child] != child:
            neighbours[child].append((parent[child], float(affinity[0, child])))
            neighbours[parent[child]].append((child, float(affinity[0, child])))
    expected = torch.zeros(nodes, 3, dtype=torch.float64)
    for source in range(nodes):
        weight = {source: 1.0}
        stack = [source]
        while stack:                                          # products along the unique tree paths
            node = stack.pop()
            for other, edge in neighbours[node]:
                if other not in weight:
                    weight[other] = weight[node] * edge
                    stack.append(other)
        expected[source] = sum(w * values[0, j].double() for j, w in weight.items()) / sum(weight.values())
    for got in (tree_filter_reference(values, forest, affinity), tree_filter(values, forest, affinity, backend="host")):
        torch.testing.assert_close(got[0].double(), expected, rtol=1e-5, atol=1e-6)


def test_depths_by_pointer_jumping():
    _, forest, _ = problem(2, 6, 7, 1, seed=4)
    depth = depths(forest)
    for image in range(2):
        parent = forest.parent[image].tolist()
        for node in range(42):
            steps, walker = 0, node
            while parent[walker] != walker:
                walker, steps = parent[walker], steps + 1
            assert depth[image, node] == steps


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_host_path_matches_reference(dtype):
    values, forest, affinity = problem(3, 17, 23, 7, seed=2, dtype=dtype)
    torch.testing.assert_close(tree_filter(values, forest, affinity, backend="host"),
                               tree_filter_reference(values, forest, affinity), rtol=1e-5, atol=1e-5)


@NEEDS_TRITON
@pytest.mark.parametrize("channels,dtype", [(3, torch.float32), (40, torch.float32), (7, torch.bfloat16),
                                            (5, torch.float16)])
def test_triton_kernel_matches_reference(channels, dtype):
    """40 channels: two programs per image (blocks of 32), each with its own normaliser."""
    device = "cpu" if TRITON_ON_CPU else "cuda"
    values, forest, affinity = problem(2, 9, 8, channels, seed=3, dtype=dtype)
    got = tree_filter(values.to(device), forest.to(device), affinity.to(device), backend="triton")
    assert got.dtype == torch.float32 and got.shape == values.shape
    torch.testing.assert_close(got.cpu(), tree_filter_reference(values, forest, affinity), rtol=1e-5, atol=1e-5)


def test_bad_shapes_and_backend_are_named():
    values, forest, affinity = problem(1, 4, 4, 2, seed=5)
    with pytest.raises(ValueError, match="affinity"):
        tree_filter(values, forest, affinity[:, :-1])
    with pytest.raises(ValueError, match="values"):
        tree_filter(values[0], forest, affinity)
    with pytest.raises(ValueError, match="backend"):
        tree_filter(values, forest, affinity, backend="cuda")
