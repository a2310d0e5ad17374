"""What a training step of the default objective asks of the host, counted
with a ``TorchDispatchMode`` (``benchmarks.host_cost``): ATen calls that do
not grow with the crop (the trees' depth grows with it), and no operation
that would make a GPU wait for the host. The trees and maps that depend only
on the sample come from the data pipeline (``objective.sample_preparer``)."""
import functools

import pytest
import torch
from dataclasses import replace

from spml_fast.benchmarks.bench_train_step import _batch
from spml_fast.benchmarks.host_cost import HostCost
from spml_fast.config import PRESETS
from spml_fast.data import SegmentationDataset, collate, read_list
from spml_fast.losses import ColourTree
from spml_fast.objective import SMALL_KEYS, compute, prepare_sample, sample_preparer, small_maps
from spml_fast.relations import MemoryBank
from spml_fast.synth import CLASSES, SynthConfig, write_dataset
from spml_fast.train import SpmlModel

MAX_ATEN_CALLS = 300
MAX_SYNC_OPS = 4


def pipeline_batch(config, crop: int, num_classes: int = 6) -> dict:
    """The benchmark's batch, each sample prepared as the data loader's workers prepare it."""
    raw = _batch(dict(crop=crop, batch=2), "cpu")
    prepare = sample_preparer(config, num_classes)
    samples = [prepare({key: value[i] for key, value in raw.items()}) for i in range(2)]
    return dict(collate(samples), image_ids=torch.arange(2))


def step_cost(config, batch) -> HostCost:
    """The second step's count (the first fills per-grid caches such as the pixel positions)."""
    torch.manual_seed(0)
    model = SpmlModel(config, 6).train()
    compute(model, batch, MemoryBank(2), config, 6)[0].backward()
    with HostCost() as cost:
        total, _, _ = compute(model, batch, MemoryBank(2), config, 6)
        total.backward()
    return cost


def test_default_step_asks_little_of_the_host_at_two_crops():
    config = PRESETS["synthetic-scribble"]
    costs = {crop: step_cost(config, pipeline_batch(config, crop)) for crop in (128, 512)}
    for crop, cost in costs.items():
        assert cost.aten_calls <= MAX_ATEN_CALLS, (crop, cost.aten_calls, cost.by_op.most_common(10))
        assert cost.sync_ops <= MAX_SYNC_OPS, (crop, dict(cost.sync_by_op))
    assert costs[128].aten_calls == costs[512].aten_calls          # nothing per tree level or per pixel


def test_the_counter_sees_synchronising_operations():
    with HostCost() as cost:
        values = torch.arange(6.0)
        values[values > 2].sum().item()
        bool(values.any())
    assert cost.sync_by_op["index"] == 1 and cost.sync_by_op["_local_scalar_dense"] == 2


def test_pipeline_maps_give_the_step_the_same_loss():
    config = PRESETS["synthetic-scribble"]
    delivered = pipeline_batch(config, 64)
    bare = {key: value for key, value in delivered.items() if key not in SMALL_KEYS + ColourTree.KEYS}
    losses = []
    for batch in (delivered, bare):
        torch.manual_seed(0)
        model = SpmlModel(config, 6).train()
        losses.append(compute(model, batch, MemoryBank(2), config, 6)[1])
    for term in ("partial_ce", "tree_energy", "gaussian_mixture"):
        assert float(losses[0][term]) == float(losses[1][term])


def test_preparer_follows_the_objective(tmp_path):
    assert sample_preparer(PRESETS["synthetic-scribble-pce"], 6) is None
    agmm_only = replace(PRESETS["synthetic-scribble"],
                        objective=replace(PRESETS["synthetic-scribble"].objective, tree_energy=0.0))
    assert sample_preparer(agmm_only, 6).keywords["colour_sigma"] is None
    root = str(tmp_path)
    write_dataset(root, SynthConfig(train_images=2, val_images=1, size=48), progress=False)
    config = PRESETS["synthetic-scribble"]
    dataset = SegmentationDataset(read_list(root, "train_scribble.txt"), len(CLASSES), root, train=True,
                                  augment=replace(config.augment, crop=40),
                                  prepare=sample_preparer(config, len(CLASSES)))
    sample = dataset[0]
    assert sample["small_colours"].shape == (3, 10, 10) and sample["small_label"].shape == (10, 10)
    assert sample["colour_parent"].shape == sample["colour_order"].shape == sample["colour_affinity"].shape == (100,)
    expected = small_maps(sample["image"][None], sample["label"][None], sample["valid"][None], len(CLASSES),
                          config.objective.tree.colour_sigma)
    for key, value in expected.items():
        assert torch.equal(sample[key], value[0]), key


def test_cuda_path_host_cost_with_the_launches_stubbed(monkeypatch):
    """The Triton path (CUDA) on the same step, its kernels replaced by no-ops: what is left is what the
    path asks of the host (allocations, views, the affinity and loss arithmetic), which a launch does
    not add to. Inside ``use_backend("triton")`` the tree ops take that path on the CPU."""
    import spml_fast.triton_kernels.spanning_tree as spanning
    import spml_fast.triton_kernels.tree_filter as filtering
    from spml_fast.ops.dispatch import use_backend

    class NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None
    for module, names in ((spanning, ("edge_distance_kernel", "boruvka_kernel", "euler_kernel", "rank_kernel",
                                      "parent_kernel", "order_kernel")), (filtering, ("tree_filter_kernel",))):
        for name in names:
            monkeypatch.setattr(module, name, NoLaunch())
    config = PRESETS["synthetic-scribble"]
    with use_backend("triton"):
        costs = [step_cost(config, pipeline_batch(config, crop)) for crop in (128, 512)]
    assert all(cost.aten_calls <= MAX_ATEN_CALLS and cost.sync_ops == 0 for cost in costs), \
        [(cost.aten_calls, dict(cost.sync_by_op)) for cost in costs]
    assert costs[0].aten_calls == costs[1].aten_calls
