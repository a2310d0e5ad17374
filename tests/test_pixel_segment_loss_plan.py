"""The Triton kernels' visit plan (ops/contrast_plan.py) and the kernels run on
it: tile kinds, counts, the relation-I saving, and both kernel loops against
the dense reference on batches shaped like SPML's (segments of one label,
images as groups), so that uniform, masked and skipped tiles all occur."""
import pytest
import torch
import torch.nn.functional as F

from conftest import MODES, NEEDS_TRITON, device_for, make_problem
from spml_fast import pixel_segment_loss
from spml_fast.ops.contrast_plan import MASKED, NEGATIVE, POSITIVE, _slots, build_plan
from spml_fast.ops.membership import membership
from spml_fast.ops.reference import pixel_segment_loss_dense


def spml_batch(images=4, pixels_per_image=128, segments_per_image=64, classes=3, dim=16, set_mode=False,
               unlabelled=0.0, seed=0, device="cpu"):
    """Pixels grouped into segments; a segment's pixels share its label; groups = images."""
    gen = torch.Generator().manual_seed(seed)
    num_segments = images * segments_per_image
    segment_image = torch.arange(num_segments) // segments_per_image
    segment_label = torch.randint(0, classes, (num_segments,), generator=gen)
    segment = torch.cat([i * segments_per_image + torch.randint(0, segments_per_image, (pixels_per_image,),
                                                                generator=gen) for i in range(images)])
    pixel_label = segment_label[segment].clone()
    pixel_label[torch.rand(segment.shape[0], generator=gen) < unlabelled] = -1
    if set_mode:   # image tag sets: bits of the classes of the image's segments
        tags = torch.zeros(images, 1, dtype=torch.int64)
        for s in range(num_segments):
            tags[segment_image[s], 0] |= 1 << int(segment_label[s])
        pixel_labels, prototype_labels = tags[segment // segments_per_image], tags[segment_image]
    else:
        pixel_labels, prototype_labels = pixel_label, segment_label
    embeddings = F.normalize(torch.randn(segment.shape[0], dim, generator=gen), dim=1)
    prototypes = F.normalize(torch.randn(num_segments, dim, generator=gen), dim=1)
    groups = dict(pixel_groups=segment // segments_per_image, prototype_groups=segment_image)
    to = lambda t: t.to(device)
    return (to(embeddings), to(prototypes), to(segment), to(pixel_labels), to(prototype_labels),
            {k: to(v) for k, v in groups.items()})


@pytest.mark.parametrize("set_mode", [False, True])
@pytest.mark.parametrize("with_groups", [False, True])
def test_plan_tile_kinds_match_brute_force(set_mode, with_groups):
    """In the kernels' slots, every uniform tile pair is what its kind says for every live pixel and kept
    segment (the own segment and empty slots aside: the excluding loop drops them; the plain uniform
    loop sees neither), and no member pair lies in a skipped tile."""
    embeddings, prototypes, segment, pixel_labels, prototype_labels, groups = spml_batch(
        set_mode=set_mode, unlabelled=0.3)
    groups = groups if with_groups else dict(pixel_groups=None, prototype_groups=None)
    plan = build_plan(segment, pixel_labels, prototype_labels, groups["pixel_groups"], groups["prototype_groups"],
                      16, 16)
    positive, negative = membership(pixel_labels, prototype_labels, groups["pixel_groups"],
                                    groups["prototype_groups"])
    own = torch.arange(prototypes.shape[0])[None, :] == segment[:, None]
    positive, negative = positive & ~own, negative & ~own

    held = torch.nonzero(plan.pixel_index >= 0).squeeze(1)            # slots of the participating pixels
    pixels = plan.pixel_index[held]

    def in_slots(mask):
        out = torch.zeros(plan.n_pad, plan.m_pad, dtype=torch.bool)
        out[held[:, None], plan.prototype_slot[None, :]] = mask[pixels]
        return out
    positive, negative, own = in_slots(positive), in_slots(negative), in_slots(own)
    live = plan.pixel_index >= 0
    kept = torch.zeros(plan.m_pad, dtype=torch.bool)
    kept[plan.prototype_slot] = True if plan.prototype_dropped is None else ~plan.prototype_dropped[:, 0]
    kinds, counts = plan.kinds(), plan.row_counts.long()
    entries = plan.row_entries.long()
    for row in range(plan.tiles_n):
        plain = {int(entries[row, visit]) >> 1 for visit in range(int(counts[row, 0]))}
        for col in range(plan.tiles_m):
            block = (slice(16 * row, 16 * row + 16), slice(16 * col, 16 * col + 16))
            rows, cols = live[block[0]], kept[block[1]]
            expected = {POSITIVE: positive, NEGATIVE: negative}.get(int(kinds[row, col]))
            if expected is not None:
                wanted = rows[:, None] & cols[None, :] & ~own[block]
                assert bool((expected[block] == wanted).all()), (row, col)
                if col in plain:
                    assert bool(cols.all()) and not bool((own[block] & rows[:, None]).any())
            elif kinds[row, col] != MASKED:
                assert not bool((positive[block] | negative[block]).any())
    described = plan.describe()
    assert described["uniform_tiles"] > 0 and described["excluding_tiles"] > 0
    if with_groups:
        assert (kinds == 0).any()                      # other images' tiles are skipped


def test_visit_rows_and_columns_list_the_same_pairs():
    _, _, segment, pixel_labels, prototype_labels, groups = spml_batch(unlabelled=0.3)
    plan = build_plan(segment, pixel_labels, prototype_labels, groups["pixel_groups"], groups["prototype_groups"],
                      16, 16)

    def pairs(entries, counts, transpose):
        found = set()
        for tile in range(entries.shape[0]):
            for visit in range(int(counts[tile, -1])):
                entry = int(entries[tile, visit])
                loop = sum(visit >= int(counts[tile, k]) for k in range(3))
                found.add(((entry >> 1, tile) if transpose else (tile, entry >> 1)) + (entry & 1, loop))
        return found
    assert pairs(plan.row_entries, plan.row_counts, False) == pairs(plan.col_entries, plan.col_counts, True)


def test_plan_sizes_come_from_the_shapes():
    """Two calls of one shape with different labels and groups: the same padded lengths and visit
    matrices' shapes (a CUDA graph can replay them), whatever the number of groups."""
    shapes = set()
    for seed, images in ((0, 2), (1, 8)):
        _, _, segment, pixel_labels, prototype_labels, groups = spml_batch(images=images, pixels_per_image=512 // images,
                                                                          segments_per_image=128 // images, seed=seed)
        plan = build_plan(segment, pixel_labels, prototype_labels, groups["pixel_groups"],
                          groups["prototype_groups"], 16, 16)
        shapes.add((plan.n_pad, plan.m_pad, tuple(plan.row_entries.shape), tuple(plan.col_entries.shape)))
    assert len(shapes) == 1


def test_relation_image_visits_under_a_fifth_of_a_dense_sweep():
    """Relation I of 8 images (about 16k pixels and 300 segments each, 60 regions per image) at the GPU
    tile sizes: a pixel tile visits only its own image's prototype tiles (under 18 % of a dense sweep,
    the pixel tiles added by padding each region's run included), at most 35 % of those visits are
    masked, and every masked visit takes the column-masked loop (each pixel tile holds one region).
    (The CPU builds the plan with the PyTorch form of the rule; the kernels' equality with it is tested
    below.)"""
    gen = torch.Generator().manual_seed(0)
    images, pixels, segments = 8, 16384, 300
    segment = torch.cat([i * segments + torch.randint(0, segments, (pixels,), generator=gen) for i in range(images)])
    region = torch.randint(0, 60, (images * segments,), generator=gen) + 60 * (torch.arange(images * segments)
                                                                               // segments)
    plan = build_plan(segment, region[segment], region, segment // segments, torch.arange(images * segments) // segments,
                      64, 128)
    described = plan.describe()
    assert described["visited_fraction"] <= 0.18, described
    masked = described["masked_tiles"] / (described["uniform_tiles"] + described["excluding_tiles"] + described["masked_tiles"])
    assert masked <= 0.35, described
    assert described["pair_masked_tiles"] == 0 and bool(plan.pixel_tile_types.any()), described


@NEEDS_TRITON
@pytest.mark.parametrize("set_mode", [False, True])
@pytest.mark.parametrize("with_groups", [False, True])
@pytest.mark.parametrize("tiles", [(16, 16), (64, 128)])
def test_visit_plan_kernels_match_the_pytorch_rule(set_mode, with_groups, tiles, monkeypatch):
    """``triton_kernels.visit_plan`` (what a GPU runs) gives the lists of ``visit_lists_reference`` (what
    the CPU runs), at the interpreter's tiles and the sm90 tiles, with several chunks of other tiles."""
    from spml_fast.ops import contrast_plan
    from spml_fast.triton_kernels import visit_plan
    block_n, block_m = tiles
    scale = 10 if block_n == 64 else 1                # 80 pixel tiles: two chunks of a column
    _, _, segment, pixel_labels, prototype_labels, groups = spml_batch(
        images=4, pixels_per_image=128 * scale, segments_per_image=64 * scale // 2, set_mode=set_mode, unlabelled=0.2)
    groups = groups if with_groups else dict(pixel_groups=None, prototype_groups=None)
    captured = []
    original = contrast_plan.visit_lists_reference

    def capture(*args):
        captured.append(args)
        return original(*args)
    monkeypatch.setattr(contrast_plan, "visit_lists_reference", capture)
    build_plan(segment, pixel_labels, prototype_labels, groups["pixel_groups"], groups["prototype_groups"],
               block_n, block_m)
    expected = original(*captured[0])
    got = visit_plan.launch_visit_plan(*captured[0])
    assert expected[0].shape[1] > visit_plan.CHUNK or expected[2].shape[1] > visit_plan.CHUNK or block_n == 16
    assert torch.equal(got[4], expected[4])                                   # the pixel tiles of one type
    for (entries, counts), (want_entries, want_counts) in ((got[:2], expected[:2]), (got[2:4], expected[2:4])):
        assert torch.equal(counts, want_counts)
        for tile in range(counts.shape[0]):
            visits = int(counts[tile, -1])
            assert torch.equal(entries[tile, :visits], want_entries[tile, :visits]), tile


@NEEDS_TRITON
@pytest.mark.parametrize("set_mode", [False, True])
@pytest.mark.parametrize("with_groups", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernels_on_spml_batches_match_dense(set_mode, with_groups, dtype):
    device = device_for("triton")
    embeddings, prototypes, segment, pixel_labels, prototype_labels, groups = spml_batch(
        set_mode=set_mode, unlabelled=0.2, device=device)
    groups = groups if with_groups else {}
    e, p = embeddings.to(dtype).clone().requires_grad_(), prototypes.to(dtype).clone().requires_grad_()
    loss = pixel_segment_loss(e, p, segment, pixel_labels, prototype_labels, kappa=12.0, backend="triton", **groups)
    loss.backward()
    # the reference sees the same (rounded) inputs, in float64
    e64, p64 = e.detach().double().requires_grad_(), p.detach().double().requires_grad_()
    expected = pixel_segment_loss_dense(e64, p64, segment, pixel_labels, prototype_labels, kappa=12.0, **groups)
    expected.backward()
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(loss.double(), expected.double(), rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(e.grad.double(), e64.grad.double(), rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(p.grad.double(), p64.grad.double(), rtol=tolerance, atol=tolerance)


@NEEDS_TRITON
@pytest.mark.parametrize("kappa", [64.0, 200.0])
def test_far_apart_sets_stay_exact(kappa, monkeypatch):
    """kappa = 64 and 200: a pixel's positives lie 128-400 nats below its negatives, past float32's range
    under the masked loop's shared max: the fast launch flags the rows, the exact launch (each set its
    own max) redoes them; without it the positive sets are lost."""
    device = device_for("triton")
    dim = 8
    axis = F.normalize(torch.ones(dim), dim=0)
    embeddings = axis.expand(20, dim).clone()
    prototypes = torch.cat([-axis.expand(6, dim), axis.expand(26, dim)])          # positives opposite the pixels
    prototypes = F.normalize(prototypes + 0.01 * torch.randn(32, dim, generator=torch.Generator().manual_seed(1)),
                             dim=1)
    prototype_labels = torch.tensor([0] * 6 + [1] * 26)
    pixel_labels = torch.zeros(20, dtype=torch.int64)
    segment = torch.zeros(20, dtype=torch.int64)
    args = [t.to(device) for t in (embeddings, prototypes, segment, pixel_labels, prototype_labels)]
    got = pixel_segment_loss(*args, kappa=kappa, reduction="none", backend="triton")
    expected = pixel_segment_loss_dense(*[a.double() if a.is_floating_point() else a for a in args], kappa=kappa,
                                        reduction="none")
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), expected.double(), rtol=1e-5, atol=1e-3)
    from spml_fast.triton_kernels import pixel_segment_fwd
    monkeypatch.setattr(pixel_segment_fwd, "LAUNCHES", (False,))
    fast_only = pixel_segment_loss(*args, kappa=kappa, reduction="none", backend="triton")
    assert not torch.allclose(fast_only.double(), expected.double(), rtol=1e-3, atol=1e-1)


@NEEDS_TRITON
def test_same_bits_twice():
    """Pinned configs, a fixed visit order and no atomics: two calls give identical bits."""
    device = device_for("triton")
    embeddings, prototypes, segment, pixel_labels, prototype_labels, groups = spml_batch(device=device)
    results = []
    for _ in range(2):
        e, p = embeddings.clone().requires_grad_(), prototypes.clone().requires_grad_()
        loss = pixel_segment_loss(e, p, segment, pixel_labels, prototype_labels, kappa=10.0, backend="triton",
                                  **groups)
        loss.backward()
        results.append((loss.detach(), e.grad, p.grad))
    for first, second in zip(*results):
        assert torch.equal(first, second)


@NEEDS_TRITON
def test_segments_of_no_pixels_group_take_no_part():
    """Group -1 for some segments (the trainer's memory bank entries of no image in the batch, say):
    partners of no pixel, the loss as the dense reference has it."""
    device = device_for("triton")
    embeddings, prototypes, segment, pixel_labels, prototype_labels, groups = spml_batch(unlabelled=0.2,
                                                                                       device=device)
    prototype_groups = groups["prototype_groups"].clone()
    outside = torch.arange(prototype_groups.shape[0], device=device) % 5 == 0
    prototype_groups[outside & (torch.arange(prototype_groups.shape[0], device=device)[:, None]
                                != segment[None, :]).all(1)] = -1
    kwargs = dict(pixel_groups=groups["pixel_groups"], prototype_groups=prototype_groups, reduction="none")
    got = pixel_segment_loss(embeddings, prototypes, segment, pixel_labels, prototype_labels, kappa=10.0,
                             backend="triton", **kwargs)
    expected = pixel_segment_loss_dense(embeddings.double(), prototypes.double(), segment, pixel_labels,
                                        prototype_labels, kappa=10.0, **kwargs)
    assert bool((prototype_groups == -1).any())
    torch.testing.assert_close(got.double(), expected.double(), rtol=1e-5, atol=1e-5)


def test_slots_start_runs_on_tile_boundaries_within_the_budget():
    """Runs of lengths 3, 2, 5, 1 in tiles of 4: padding 1, 2, 3 after them. With a budget of 6 every run
    starts on a tile boundary; with 4 the last one does not (the slots only stay increasing)."""
    runs = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 3])
    assert _slots(runs, 4, 6).tolist() == [0, 1, 2, 4, 5, 8, 9, 10, 11, 12, 16]
    assert _slots(runs, 4, 4).tolist() == [0, 1, 2, 4, 5, 8, 9, 10, 11, 12, 14]


def test_pixel_tiles_of_one_type_hold_one_type():
    """More pixel types than the padding budget holds: the tiles flagged as one type (the column-masked
    loop's) have every slot with the first slot's ranges and a partner; the others exist too; every
    participating pixel has exactly one slot, padding slots none."""
    problem = make_problem(200, 60, mode="single+groups", num_classes=12)
    plan = build_plan(problem.segment, problem.pixel_labels, problem.prototype_labels,
                      problem.groups["pixel_groups"], problem.groups["prototype_groups"], 16, 16)
    ranges = plan.pixel_ranges.view(plan.tiles_n, 16, 5)[:, :, 1:]
    one_type = plan.pixel_tile_types
    assert bool(one_type.any()) and bool((~one_type & (ranges[:, :, 1] > 0).any(1)).any())
    assert bool((ranges[one_type] == ranges[one_type][:, :1]).all()) and bool((ranges[one_type][:, 0, 1] > 0).all())
    held = plan.pixel_index[plan.pixel_index >= 0]
    participating = torch.nonzero(problem.pixel_labels >= 0).squeeze(1)
    assert torch.equal(held.sort().values, participating)


@NEEDS_TRITON
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_column_and_pair_masked_loops_match_dense(mode, dtype):
    """A batch with more pixel types than the padding budget: some pixel tiles hold one type (the
    column-masked loop, which keeps the own segment's term for the dE kernel to take out), others several
    (the pair-masked loop). Loss and both gradients against float64."""
    problem = make_problem(200, 60, mode=mode, num_classes=12)
    plan = build_plan(problem.segment, problem.pixel_labels, problem.prototype_labels,
                      problem.groups.get("pixel_groups"), problem.groups.get("prototype_groups"), 16, 16)
    assert plan.describe()["column_masked_tiles"] > 0 and plan.describe()["pair_masked_tiles"] > 0
    device = device_for("triton")
    e = problem.embeddings.to(device=device, dtype=dtype).requires_grad_()
    p = problem.prototypes.to(device=device, dtype=dtype).requires_grad_()
    args = [t.to(device) for t in problem.args()[2:]]
    groups = {k: v.to(device) for k, v in problem.groups.items()}
    loss = pixel_segment_loss(e, p, *args, kappa=12.0, backend="triton", **groups)
    loss.backward()
    e64, p64 = e.detach().double().requires_grad_(), p.detach().double().requires_grad_()
    expected = pixel_segment_loss_dense(e64, p64, *args, kappa=12.0, **groups)
    expected.backward()
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(loss.double(), expected.double(), rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(e.grad.double(), e64.grad.double(), rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(p.grad.double(), p64.grad.double(), rtol=tolerance, atol=tolerance)
