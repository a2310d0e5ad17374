"""Data readers on real files written by the tests, including the bad-file errors."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from spml_fast.data import (DataError, EpochSampler, SegmentationDataset, check_entries, collate, load_image,
                            read_classes, read_list, tags_to_words)
from spml_fast.synth import CLASSES, SynthConfig, make_scene, write_dataset


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synth"))
    write_dataset(root, SynthConfig(train_images=6, val_images=2, size=48), progress=False)
    return root


def test_synth_is_deterministic_and_consistent():
    a, b = make_scene(7, SynthConfig(size=48)), make_scene(7, SynthConfig(size=48))
    for key in ("image", "mask", "scribble", "point", "box"):
        assert np.array_equal(a[key], b[key])
    mask, scribble = a["mask"], a["scribble"]
    labelled = scribble != 255
    assert labelled.any() and np.array_equal(scribble[labelled], mask[labelled])   # scribbles agree with truth
    assert np.all(a["box"][mask > 0] == 255)                                        # objects inside boxes
    assert a["tags"] == sorted(set(np.unique(mask).tolist()) - {0})


def test_list_file_reader(synth_root):
    entries = read_list(synth_root, "train_scribble.txt")
    assert len(entries) == 6 and entries[0].image.endswith("JPEGImages/0000.png")
    assert entries[0].label.endswith("scribble/0000.png") and entries[0].overseg is None
    tags_only = read_list(synth_root, "train_tag.txt")
    assert tags_only[0].label is None
    dataset = SegmentationDataset(tags_only, len(CLASSES), synth_root, train=False)
    sample = dataset[0]
    given = json.load(open(os.path.join(synth_root, "tags.json")))["JPEGImages/0000.png"]
    assert torch.equal(sample["tags"], torch.from_numpy(tags_to_words(given, len(CLASSES))))
    assert (sample["label"] == 255).all()


def test_sample_shapes_and_overseg_cache(synth_root):
    dataset = SegmentationDataset(read_list(synth_root, "train_scribble.txt"), len(CLASSES), synth_root,
                                  train=False)
    sample = dataset[1]
    assert sample["image"].shape == (3, 48, 48) and sample["label"].shape == (48, 48)
    assert sample["overseg"].min() == 0 and sample["overseg"].max() > 2
    cache = os.path.join(synth_root, ".cache", "overseg")
    files = [f for _, _, names in os.walk(cache) for f in names]
    assert files, "the computed over-segmentation is cached on disk"
    again = dataset[1]
    assert torch.equal(again["overseg"], sample["overseg"])


def test_given_overseg_column(synth_root, tmp_path):
    regions = np.arange(48 * 48, dtype=np.uint16).reshape(48, 48) // 100
    Image.fromarray(regions).save(tmp_path / "regions.png")
    list_file = tmp_path / "list.txt"
    list_file.write_text(f"JPEGImages/0000.png scribble/0000.png {tmp_path / 'regions.png'}\n")
    dataset = SegmentationDataset(read_list(synth_root, str(list_file), allow_outside_root=True), len(CLASSES),
                                  synth_root, train=False)
    assert int(dataset[0]["overseg"].max()) == int(regions.max())


def test_augmentation_is_a_function_of_seed_epoch_index(synth_root):
    entries = read_list(synth_root, "train_scribble.txt")
    first = SegmentationDataset(entries, len(CLASSES), synth_root, seed=3)
    second = SegmentationDataset(entries, len(CLASSES), synth_root, seed=3)
    for dataset in (first, second):
        dataset.set_epoch(2)
    a, b = first[4], second[4]
    for key in ("image", "label", "overseg", "valid"):
        assert torch.equal(a[key], b[key])
    first.set_epoch(3)
    assert not torch.equal(first[4]["image"], a["image"])


def test_epoch_sampler_resumes_mid_epoch():
    sampler = EpochSampler(10, seed=1, rank=0, world_size=1)
    sampler.set_epoch(4)
    full = list(sampler)
    sampler.set_epoch(4, start=6)
    assert list(sampler) == full[6:] and sorted(full) == list(range(10))
    ranks = [EpochSampler(10, 1, r, 2) for r in range(2)]
    for s in ranks:
        s.set_epoch(0)
    assert sorted(list(ranks[0]) + list(ranks[1])) == list(range(10))


def _write_list(tmp_path, line):
    path = tmp_path / "list.txt"
    path.write_text(line + "\n")
    return str(path)


def test_missing_image_names_the_file(synth_root, tmp_path):
    dataset = SegmentationDataset(read_list(synth_root, _write_list(tmp_path, "JPEGImages/nope.png")),
                                  len(CLASSES), synth_root, train=False)
    with pytest.raises(DataError, match="image not found: .*nope.png"):
        dataset[0]


def test_unreadable_image_names_the_file(synth_root, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    dataset = SegmentationDataset(read_list(synth_root, _write_list(tmp_path, str(tmp_path / "broken.png")),
                                            allow_outside_root=True), len(CLASSES), synth_root, train=False)
    with pytest.raises(DataError, match="cannot read image .*broken.png"):
        dataset[0]


def test_label_out_of_range_names_file_and_value(synth_root, tmp_path):
    label = np.zeros((48, 48), dtype=np.uint8)
    label[3, 3] = 17
    Image.fromarray(label).save(tmp_path / "bad_label.png")
    line = f"JPEGImages/0000.png {tmp_path / 'bad_label.png'}"
    dataset = SegmentationDataset(read_list(synth_root, _write_list(tmp_path, line), allow_outside_root=True),
                                  len(CLASSES), synth_root, train=False)
    with pytest.raises(DataError, match=r"bad_label.png holds value 17, outside \[0, 6\)"):
        dataset[0]


def test_skip_bad_warns_and_skips(synth_root, tmp_path):
    path = tmp_path / "list.txt"
    path.write_text("JPEGImages/nope.png\nJPEGImages/0001.png\n")
    dataset = SegmentationDataset(read_list(synth_root, str(path)), len(CLASSES), synth_root, train=False,
                                  skip_bad=True)
    with pytest.warns(UserWarning, match="nope.png"):
        batch = collate([dataset[0], dataset[1]])
    assert batch["image"].shape[0] == 1


def test_list_and_classes_errors(tmp_path):
    with pytest.raises(DataError, match="list file not found"):
        read_list(str(tmp_path), "absent.txt")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(DataError, match="list file is empty"):
        read_list(str(tmp_path), "empty.txt")
    (tmp_path / "wide.txt").write_text("a b c d\n")
    with pytest.raises(DataError, match="wide.txt:1"):
        read_list(str(tmp_path), "wide.txt")
    assert read_classes("3") == ["background", "class1", "class2"]
    with pytest.raises(DataError, match="classes file not found"):
        read_classes(str(tmp_path / "nope.txt"))


def test_shading_darkens_objects_towards_their_outline():
    from spml_fast.synth import _shade
    disk = np.zeros((41, 41), dtype=bool)
    yy, xx = np.mgrid[:41, :41]
    disk[(yy - 20) ** 2 + (xx - 20) ** 2 <= 15 ** 2] = True
    factor = _shade(disk, 0.6)
    assert factor[20, 20] == pytest.approx(1.0)
    outline = disk & ~ndimage.binary_erosion(disk)
    assert factor[outline].max() < 0.6 and factor[disk].min() >= 0.4 - 1e-9
    assert factor[20, 8] < factor[20, 14] < factor[20, 20]                  # monotone towards the centre
    flat = make_scene(3, SynthConfig(size=48, shading=0.0)), make_scene(3, SynthConfig(size=48, shading=0.6))
    assert np.array_equal(flat[0]["mask"], flat[1]["mask"])                 # same scene, only darker rims
    objects = flat[0]["mask"] > 0
    assert flat[1]["image"][objects].mean() < flat[0]["image"][objects].mean()


def test_scribbles_keep_the_margin_inside_objects():
    from spml_fast.synth import _stroke
    region = np.zeros((64, 64), dtype=bool)
    region[8:56, 12:52] = True
    depth = ndimage.distance_transform_edt(region)
    for seed in range(5):
        stroke = _stroke(np.random.default_rng(seed), region, 0, margin=0.35)
        assert stroke.any() and depth[stroke].min() >= 0.35 * depth.max()
    loose = _stroke(np.random.default_rng(0), region, 0, margin=0.0)
    assert depth[loose].min() < 0.35 * depth.max()                         # the margin is what keeps it in


@pytest.mark.parametrize("flags, scenes", [([], SynthConfig(size=32)),
                                           (["--shading", "0", "--scribble-margin", "0"],
                                            SynthConfig(size=32, shading=0.0, scribble_margin=0.0))])
def test_synth_command_writes_the_configured_scenes(tmp_path, flags, scenes):
    from spml_fast.cli import main
    assert main(["synth", "--out", str(tmp_path), "--train-images", "2", "--val-images", "1", "--size", "32"]
                + flags) == 0
    expected = make_scene(scenes.seed * 1_000_003 + 1, scenes)
    written = np.asarray(Image.open(tmp_path / "JPEGImages" / "0001.png").convert("RGB"))
    assert np.array_equal(written, expected["image"])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "scribble" / "0001.png")), expected["scribble"])
    assert len(read_list(str(tmp_path), "val.txt")) == 1


def test_scene_statistics_measure_the_unlabelled_rims():
    from spml_fast.data import OversegConfig
    from spml_fast.experiments import to_markdown
    from spml_fast.synth import scene_statistics
    middle_only = scene_statistics(SynthConfig(size=48), OversegConfig(), scenes=3)
    anywhere = scene_statistics(SynthConfig(size=48, shading=0.0, scribble_margin=0.0), OversegConfig(), scenes=3)
    assert 0.2 < middle_only["rim_fraction"] < 0.8 and anywhere["rim_fraction"] == 0.0
    assert 0.0 < middle_only["labelled_fraction"] < anywhere["labelled_fraction"] < 0.1
    assert 0.0 <= middle_only["rim_sharing_a_region_with_the_middle"] <= 1.0
    cell = dict(mIoU=0.5, per_class=[0.5])
    text = to_markdown({"supervision": {"scribbles": cell}, "ablation": {}, "baseline": cell, "scenes": middle_only})
    assert f"{100 * middle_only['rim_fraction']:.0f}% of the object pixels" in text


def test_list_paths_stay_in_the_data_root_and_the_list_is_looked_up_there(synth_root, tmp_path, monkeypatch):
    outside = tmp_path / "outside.txt"
    outside.write_text("../../etc/passwd\n")
    with pytest.raises(DataError, match="outside the data root"):
        read_list(synth_root, str(outside))
    outside.write_text(f"{tmp_path / 'x.png'}\n")
    with pytest.raises(DataError, match="--allow-outside-root"):
        read_list(synth_root, str(outside))
    assert read_list(synth_root, str(outside), allow_outside_root=True)[0].image == str(tmp_path / "x.png")
    # a stray val.txt in the working directory does not replace the data root's
    monkeypatch.chdir(tmp_path)
    (tmp_path / "val.txt").write_text("JPEGImages/0000.png segcls/0000.png\n")
    entries = read_list(synth_root, "val.txt")
    assert len(entries) == 2 and entries[0].image.startswith(synth_root)
    (tmp_path / "only_here.txt").write_text("JPEGImages/0000.png\n")
    with pytest.raises(DataError, match="relative to the data root"):
        read_list(synth_root, "only_here.txt")


def _png_claiming(path, width: int, height: int) -> None:
    """A tiny PNG whose header claims width x height (the CRC fixed): what a decompression bomb looks like."""
    import struct
    import zlib
    Image.new("L", (1, 1)).save(path)
    data = bytearray(open(path, "rb").read())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("side", [12000, 30000])
def test_oversized_images_are_refused_from_their_header(tmp_path, side):
    path = tmp_path / "huge.png"
    _png_claiming(path, side, side)
    with pytest.raises(DataError, match="huge.png") as caught:
        load_image(str(path))
    assert "--max-pixels" in str(caught.value) or "refused" in str(caught.value)
    Image.new("RGB", (20, 10)).save(tmp_path / "small.png")
    with pytest.raises(DataError, match="above the limit of 100"):
        load_image(str(tmp_path / "small.png"), max_pixels=100)
    assert load_image(str(tmp_path / "small.png")).shape == (10, 20, 3)


def test_listed_files_are_checked_before_any_work(synth_root, tmp_path):
    entries = read_list(synth_root, _write_list(tmp_path, "JPEGImages/0000.png\nJPEGImages/gone.png"))
    with pytest.raises(DataError, match="1 listed file.*gone.png.*--skip-bad"):
        check_entries(entries)
    with pytest.warns(UserWarning, match="gone.png"):
        assert len(check_entries(entries, skip_bad=True)) == 1
