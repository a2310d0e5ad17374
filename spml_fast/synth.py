"""The built-in default dataset: seeded, deterministic synthetic scenes in the
SPML list-file layout (docs/data.md, layouts), with exact masks and all four weak
annotations derived from them.

Each scene has a textured background (smooth noise in a random earth-tone
palette, optionally with distractor blobs: ``clutter``) and 1-4 objects of
the foreground classes. What tells the classes apart is a parameter
(``cue``): by default a class is a texture family (hue range and pattern:
stripes, dots, checks, waves, speckle) in any shape; ``colour`` keeps the
hue and draws the pattern at random, ``texture`` keeps the pattern and
draws the colour at random, ``shape`` makes the outline the class (disc,
square, triangle, star, cross) with random colour and pattern, and
``texture+shape`` ties pattern and outline to the class with random colour.
The robustness suite (``experiments --suite robustness``) trains on
families of such scenes rather than one tuned default. Objects occlude each other, colours
are jittered per object and per image. Objects are shaded like lit, rounded
things (darker towards their outline) and scribbles are drawn through the
middle of each object and of the background, as annotators draw them (or,
with ``stroke="line"``, as straight lines anywhere inside): no
labelled pixel lies near a boundary, so the labels of the pixels there must
spread through the unlabelled pixels (SPML's relations) rather than be
extrapolated from the labelled ones alone. Written:

  JPEGImages/NNNN.png        the image
  segcls/NNNN.png            exact class mask (evaluation)
  scribble/NNNN.png          strokes per object and background, 255 = unlabelled
  point/NNNN.png             one dilated point per object, two for background
  box/NNNN.png               0 outside every box, 255 inside (docs/data.md, label maps)
  boxfill/NNNN.png           box pseudo-labels: inside a box its class (smaller boxes on top), 0 outside
  tags.json                  {"JPEGImages/NNNN.png": [classes present, background excluded]}
  classes.txt                class names, one per line
  train_{scribble,point,box,boxfill,tag,full}.txt, val.txt   list files
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage import draw

from .data import IGNORE
from .io import save_json, save_png, save_text
from .overlay import palette

CLASSES = ["background", "stripes", "dots", "checks", "waves", "speckle"]
COLOURS = ["background", "red", "green", "blue", "yellow", "magenta"]
SHAPES = ["background", "disc", "square", "triangle", "star", "cross"]
CUES = ("colour+texture", "colour", "texture", "shape", "texture+shape")
OUTLINES = ("mixed", "blobs")
STROKES = ("walk", "line")


@dataclass(frozen=True)
class SynthConfig:
    train_images: int = 160
    val_images: int = 40
    size: int = 96
    seed: int = 0
    max_objects: int = 4
    classes: int = 5                 # foreground classes (at most 5)
    cue: str = "colour+texture"      # what tells the classes apart (CUES; see the module docstring)
    outlines: str = "mixed"          # object outlines unless the cue is a shape: ellipses/rectangles/polygons, or blobs
    clutter: int = 0                 # distractor blobs of random colour in the background (background class)
    scribble_width: int = 0          # stroke dilation in pixels: 0 = 1-px strokes, ~2% of pixels (VOC-like)
    stroke: str = "walk"             # "walk": a smooth random walk; "line": a straight line
    scribble_per_class: bool = False # one stroke per class present (in its largest part) instead of per object
    point_radius: int = 2
    shading: float = 0.6             # rim darkening of objects (0 = flat): brightness x (1 - shading) at the outline
    scribble_margin: float = 0.35    # strokes keep to pixels at least this fraction of the region's depth inside

    def __post_init__(self):
        if self.cue not in CUES:
            raise ValueError(f"cue must be one of {CUES}, got {self.cue!r}")
        if self.outlines not in OUTLINES:
            raise ValueError(f"outlines must be one of {OUTLINES}, got {self.outlines!r}")
        if self.stroke not in STROKES:
            raise ValueError(f"stroke must be one of {STROKES}, got {self.stroke!r}")
        if not 1 <= self.classes <= 5:
            raise ValueError(f"classes must lie in [1, 5], got {self.classes}")
        if self.train_images < 1 or self.val_images < 1 or self.size < 32:
            raise ValueError("synth: at least 1 training and 1 validation image of at least 32 pixels")

    def class_names(self) -> list[str]:
        names = {"colour": COLOURS, "shape": SHAPES,
                 "texture+shape": ["background"] + [f"{t}-{s}" for t, s in zip(CLASSES[1:], SHAPES[1:])]}
        return names.get(self.cue, CLASSES)[:self.classes + 1]


# Hue (0-1) centre of each foreground class, and its pattern.
_CLASS_HUES = {1: 0.0, 2: 0.33, 3: 0.6, 4: 0.13, 5: 0.8}


def _hsv_to_rgb(h, s, v):
    i = np.floor(h * 6).astype(int) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    rgb = np.zeros(h.shape + (3,))
    for k, (r, g, b) in enumerate(choices):
        sel = i == k
        rgb[sel, 0], rgb[sel, 1], rgb[sel, 2] = r[sel], g[sel], b[sel]
    return rgb


def _smooth_noise(rng, size, scale):
    noise = rng.standard_normal((size, size))
    noise = ndimage.gaussian_filter(noise, scale)
    return (noise - noise.min()) / (np.ptp(noise) + 1e-8)


def _texture(rng, cls: int, size: int, hue_centre: float = None) -> np.ndarray:
    """[size, size, 3] float in [0, 1]: pattern ``cls`` (1 stripes, 2 dots, 3 checks, 4 waves, 5 speckle)
    around the hue ``hue_centre`` (default: the class's own hue)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(float)
    angle = rng.uniform(0, np.pi)
    u = xx * np.cos(angle) + yy * np.sin(angle)
    period = rng.uniform(5, 9)
    if cls == 1:
        pattern = (np.sin(2 * np.pi * u / period) > 0).astype(float)
    elif cls == 2:
        pattern = ((np.sin(2 * np.pi * xx / period) * np.sin(2 * np.pi * yy / period)) > 0.5).astype(float)
    elif cls == 3:
        pattern = ((np.floor(xx / period) + np.floor(yy / period)) % 2).astype(float)
    elif cls == 4:
        pattern = 0.5 + 0.5 * np.sin(2 * np.pi * (u + 3 * np.sin(2 * np.pi * yy / 17)) / period)
    else:
        pattern = (rng.random((size, size)) > 0.6).astype(float)
    hue_centre = _CLASS_HUES[cls] if hue_centre is None else hue_centre
    hue = (hue_centre + rng.uniform(-0.05, 0.05) + 0.04 * pattern) % 1.0
    saturation = np.clip(rng.uniform(0.55, 0.9) - 0.3 * pattern, 0, 1)
    value = np.clip(rng.uniform(0.55, 0.9) + 0.25 * (pattern - 0.5), 0, 1)
    return _hsv_to_rgb(hue, saturation, value)


def _background(rng, size: int) -> np.ndarray:
    base = _smooth_noise(rng, size, rng.uniform(2, 6))
    grain = _smooth_noise(rng, size, 0.8)
    hue = (rng.uniform(0.05, 0.15) + 0.05 * grain) * np.ones((size, size))
    saturation = np.clip(rng.uniform(0.1, 0.35) + 0.1 * base, 0, 1)
    value = np.clip(0.25 + 0.5 * base + 0.1 * grain, 0, 1)
    return _hsv_to_rgb(hue, saturation, value)


def _shape_mask(rng, size: int) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    radius = rng.uniform(0.12, 0.28) * size
    cy, cx = rng.uniform(radius * 0.6, size - radius * 0.6, 2)
    kind = rng.integers(3)
    if kind == 0:
        rr, cc = draw.ellipse(cy, cx, radius, radius * rng.uniform(0.6, 1.4), shape=mask.shape,
                              rotation=rng.uniform(0, np.pi))
    elif kind == 1:
        half = radius * rng.uniform(0.7, 1.1)
        rr, cc = draw.rectangle((cy - half, cx - half * rng.uniform(0.6, 1.4)),
                                (cy + half, cx + half * rng.uniform(0.6, 1.4)), shape=mask.shape)
        rr, cc = np.clip(rr, 0, size - 1).astype(int), np.clip(cc, 0, size - 1).astype(int)
    else:
        corners = rng.integers(3, 7)
        angles = np.sort(rng.uniform(0, 2 * np.pi, corners))
        radii = radius * rng.uniform(0.7, 1.2, corners)
        rr, cc = draw.polygon(cy + radii * np.sin(angles), cx + radii * np.cos(angles), shape=mask.shape)
    mask[rr, cc] = True
    return mask


def _class_shape(rng, kind: int, size: int) -> np.ndarray:
    """[S, S] bool outline of shape ``kind`` (1 disc, 2 square, 3 triangle, 4 star, 5 cross), random
    size, position and rotation."""
    radius = rng.uniform(0.15, 0.28) * size
    cy, cx = rng.uniform(radius, size - radius, 2)
    turn = rng.uniform(0, 2 * np.pi)
    if kind == 1:
        angles = np.linspace(0, 2 * np.pi, 40, endpoint=False)
        radii = np.full(40, radius)
    elif kind in (2, 3):
        corners = 4 if kind == 2 else 3
        angles = turn + np.arange(corners) * 2 * np.pi / corners
        radii = np.full(corners, radius * (1.1 if kind == 2 else 1.25))
    elif kind == 4:
        angles = turn + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, radius * 1.25, radius * 0.5)
    else:
        arm = radius * 0.38          # a plus sign: 12 corners
        unit = np.array([(1, 3), (1, 1), (3, 1), (3, -1), (1, -1), (1, -3), (-1, -3), (-1, -1), (-3, -1),
                         (-3, 1), (-1, 1), (-1, 3)], dtype=float) * arm
        angles = np.arctan2(unit[:, 0], unit[:, 1]) + turn
        radii = np.hypot(unit[:, 0], unit[:, 1])
    mask = np.zeros((size, size), dtype=bool)
    rr, cc = draw.polygon(cy + radii * np.sin(angles), cx + radii * np.cos(angles), shape=mask.shape)
    mask[rr, cc] = True
    return mask


def _blob_mask(rng, size: int) -> np.ndarray:
    """[S, S] bool irregular blob: smooth noise thresholded inside a disc."""
    radius = rng.uniform(0.15, 0.3) * size
    cy, cx = rng.uniform(radius * 0.6, size - radius * 0.6, 2)
    yy, xx = np.mgrid[0:size, 0:size]
    distance = np.hypot(yy - cy, xx - cx) / radius
    noise = _smooth_noise(rng, size, size / 12)
    blob = distance + 0.8 * (noise - 0.5) < 1.0
    components, count = ndimage.label(blob)
    if count > 1:                    # keep the largest piece: one object, one region
        sizes = ndimage.sum(blob, components, range(1, count + 1))
        blob = components == 1 + int(np.argmax(sizes))
    return blob


def _distractors(rng, image: np.ndarray, count: int) -> None:
    """Paint ``count`` greyish blobs of random hue and smooth texture into the background (in place)."""
    size = image.shape[0]
    for _ in range(count):
        blob = _blob_mask(rng, size)
        shade = _smooth_noise(rng, size, 2.0)[..., None]
        # clutter is background: any hue but greyish (object classes are saturated, 0.55-0.9)
        colour = _hsv_to_rgb(np.full((size, size), rng.uniform()), np.full((size, size), rng.uniform(0.05, 0.35)),
                             np.full((size, size), rng.uniform(0.3, 0.8)))
        image[blob] = (colour * (0.7 + 0.3 * shade))[blob]


def _object(rng, cls: int, config: "SynthConfig") -> tuple[np.ndarray, np.ndarray]:
    """One object of class ``cls``: (outline [S, S] bool, texture [S, S, 3]) as the cue makes it."""
    size, cue = config.size, config.cue
    if cue == "colour+texture":          # the default draws exactly what it always drew
        return _shape_mask(rng, size), _texture(rng, cls, size)
    pattern = cls if cue in ("texture", "texture+shape") else int(rng.integers(1, 6))
    hue = _CLASS_HUES[cls] if cue == "colour" else rng.uniform()
    if cue in ("shape", "texture+shape"):
        shape = _class_shape(rng, cls, size)
    else:
        shape = _blob_mask(rng, size) if config.outlines == "blobs" else _shape_mask(rng, size)
    return shape, _texture(rng, pattern, size, hue)


def _shade(shape: np.ndarray, strength: float) -> np.ndarray:
    """[S, S] brightness factor of a lit, rounded object: 1 at its deepest pixel, 1 - strength at the outline."""
    depth = ndimage.distance_transform_edt(shape)
    depth = np.sqrt(np.clip(depth / max(depth.max(), 1.0), 0, 1))
    return 1.0 - strength * (1.0 - depth)


def _middle(region: np.ndarray, margin: float) -> np.ndarray:
    """[S, S] bool: the pixels of ``region`` at least ``margin`` x its largest depth from its outline."""
    depth = ndimage.distance_transform_edt(region)
    return region & (depth >= margin * depth.max())


def _stroke(rng, region: np.ndarray, width: int, margin: float = 0.0) -> np.ndarray:
    """A scribble: a smooth random walk through the region's interior, dilated by ``width``.

    The interior is the region eroded by 2 px and, with ``margin`` > 0, its middle (``_middle``: annotators
    draw through the middle of an object)."""
    eroded = ndimage.binary_erosion(region, iterations=2)
    middle = eroded & _middle(region, margin)
    # the first with room for a stroke: the middle, the eroded region, the region (tiny objects)
    inner = next((choice for choice in (middle, eroded) if choice.sum() >= 4), region)
    ys, xs = np.nonzero(inner)
    stroke = np.zeros_like(region)
    if len(ys) == 0:
        return stroke
    start = rng.integers(len(ys))
    y, x = float(ys[start]), float(xs[start])
    heading = rng.uniform(0, 2 * np.pi)
    length = int(np.sqrt(len(ys)) * 1.5) + 4
    for _ in range(length):
        iy, ix = int(round(y)), int(round(x))
        if 0 <= iy < region.shape[0] and 0 <= ix < region.shape[1] and inner[iy, ix]:
            stroke[iy, ix] = True
        heading += rng.normal(0, 0.35)
        ny, nx = y + np.sin(heading), x + np.cos(heading)
        niy, nix = int(round(ny)), int(round(nx))
        if not (0 <= niy < region.shape[0] and 0 <= nix < region.shape[1] and inner[niy, nix]):
            heading += np.pi * rng.uniform(0.5, 1.5)
            continue
        y, x = ny, nx
    # scipy dilates until nothing changes when iterations < 1: width 0 means no dilation
    return (ndimage.binary_dilation(stroke, iterations=width) if width > 0 else stroke) & region


def _line(rng, region: np.ndarray, width: int, margin: float = 0.0) -> np.ndarray:
    """A straight scribble between two interior points whose segment stays inside, dilated by ``width``."""
    inner = ndimage.binary_erosion(region, iterations=1) & _middle(region, margin)
    inner = inner if inner.sum() >= 2 else region
    ys, xs = np.nonzero(inner)
    stroke = np.zeros_like(region)
    if len(ys) == 0:
        return stroke
    best = None
    for _ in range(20):                  # the longest of 20 tries that stays inside
        first, second = rng.integers(len(ys), size=2)
        rr, cc = draw.line(ys[first], xs[first], ys[second], xs[second])
        if inner[rr, cc].all() and (best is None or len(rr) > len(best[0])):
            best = (rr, cc)
    rr, cc = best if best is not None else (ys[:1], xs[:1])
    stroke[rr, cc] = True
    return (ndimage.binary_dilation(stroke, iterations=width) if width > 0 else stroke) & region


def _scribble(rng, region: np.ndarray, config: "SynthConfig") -> np.ndarray:
    draw_stroke = _line if config.stroke == "line" else _stroke
    return draw_stroke(rng, region, config.scribble_width, config.scribble_margin)


def _point(rng, region: np.ndarray, radius: int) -> np.ndarray:
    distance = ndimage.distance_transform_edt(region)
    ys, xs = np.nonzero(distance >= max(1.0, distance.max() * 0.5))
    point = np.zeros_like(region)
    if len(ys):
        k = rng.integers(len(ys))
        point[ys[k], xs[k]] = True
    return (ndimage.binary_dilation(point, iterations=radius) if radius > 0 else point) & region


def make_scene(seed: int, config: SynthConfig) -> dict:
    """One deterministic scene: image uint8 [S, S, 3], mask, and the four weak label maps."""
    rng = np.random.default_rng(seed)
    size = config.size
    image = _background(rng, size)
    if config.clutter:
        _distractors(rng, image, config.clutter)
    mask = np.zeros((size, size), dtype=np.uint8)
    instances = []
    for _ in range(rng.integers(1, config.max_objects + 1)):
        cls = int(rng.integers(1, config.classes + 1))
        shape, texture = _object(rng, cls, config)
        if config.shading > 0:
            texture = texture * _shade(shape, config.shading)[..., None]
        image[shape] = texture[shape]
        mask[shape] = cls
        for instance in instances:       # occlusion: later objects cover earlier ones
            instance["mask"] &= ~shape
        instances.append(dict(cls=cls, mask=shape.copy()))
    instances = [inst for inst in instances if inst["mask"].sum() >= 12]
    brightness, contrast = rng.uniform(0.85, 1.15), rng.uniform(0.85, 1.15)
    image = np.clip((image - 0.5) * contrast + 0.5 * brightness + rng.normal(0, 0.02, image.shape), 0, 1)
    image = (image * 255).astype(np.uint8)
    return dict(image=image, mask=mask, **weak_labels(rng, mask, instances, config))


def weak_labels(rng, mask: np.ndarray, instances: list, config: SynthConfig) -> dict:
    """The weak annotations of a scene from its full mask [S, S] uint8 (0 = background) and its instances
    ({"cls", "mask"} each, the visible part): scribbles, points, boxes (255 inside, 0 outside), box-fill
    pseudo-labels, boxes as [cls, top, left, bottom, right] and tags. The built-in data and the real
    datasets (``real_data``) derive theirs with this one function."""
    size = mask.shape
    scribble = np.full(size, IGNORE, dtype=np.uint8)
    point = np.full(size, IGNORE, dtype=np.uint8)
    box = np.zeros(size, dtype=np.uint8)
    background = mask == 0
    for _ in range(1 if config.scribble_per_class else 2):
        scribble[_scribble(rng, background, config)] = 0
        point[_point(rng, background, config.point_radius)] = 0
    boxes = []
    for instance in instances:
        region = instance["mask"] & (mask == instance["cls"])
        if not config.scribble_per_class:
            scribble[_scribble(rng, region, config)] = instance["cls"]
        point[_point(rng, region, config.point_radius)] = instance["cls"]
        ys, xs = np.nonzero(instance["mask"])
        if len(ys):
            box[ys.min():ys.max() + 1, xs.min():xs.max() + 1] = IGNORE
            boxes.append([int(instance["cls"]), int(ys.min()), int(xs.min()), int(ys.max()), int(xs.max())])
    if config.scribble_per_class:        # one stroke per class, in its largest connected part
        for cls in sorted({inst["cls"] for inst in instances}):
            components, count = ndimage.label(mask == cls)
            if count:
                sizes = ndimage.sum(mask == cls, components, range(1, count + 1))
                scribble[_scribble(rng, components == 1 + int(np.argmax(sizes)), config)] = cls
    boxfill = np.zeros(size, dtype=np.uint8)
    for cls, top, left, bottom, right in sorted(boxes, key=lambda b: -(b[3] - b[1] + 1) * (b[4] - b[2] + 1)):
        boxfill[top:bottom + 1, left:right + 1] = cls
    tags = sorted({int(c) for c in np.unique(mask) if c != 0})
    return dict(scribble=scribble, point=point, box=box, boxfill=boxfill, boxes=boxes, tags=tags)


def scene_statistics(config: SynthConfig, overseg, scenes: int = 40) -> dict:
    """What the scribbles see of the objects, over the first ``scenes`` scenes: the labelled fraction of the
    pixels, the objects' rim fraction (pixels outside the middle that strokes keep to), and the fraction of rim
    pixels whose over-segmentation region (``overseg``: data.OversegConfig) also reaches that middle."""
    from .data import compute_overseg
    labelled, rim, shared, object_pixels = 0, 0, 0, 0
    for index in range(scenes):
        scene = make_scene(config.seed * 1_000_003 + index, config)
        regions = compute_overseg(scene["image"], overseg, cache_dir=None)
        labelled += int((scene["scribble"] != IGNORE).sum())
        for cls in scene["tags"]:
            components, count = ndimage.label(scene["mask"] == cls)
            for component in range(1, count + 1):
                region = components == component
                middle = _middle(region, config.scribble_margin)
                outer = region & ~middle
                object_pixels += int(region.sum())
                rim += int(outer.sum())
                shared += int(np.isin(regions[outer], np.unique(regions[middle])).sum())
    return dict(labelled_fraction=labelled / (scenes * config.size ** 2), rim_fraction=rim / max(object_pixels, 1),
                rim_sharing_a_region_with_the_middle=shared / max(rim, 1))


def write_dataset(root: str, config: SynthConfig = SynthConfig(), progress: bool = True) -> dict:
    """Write the dataset under ``root`` (skipping scenes already complete: a killed run resumes)."""
    from tqdm import tqdm
    total = config.train_images + config.val_images
    names = [f"{index:04d}" for index in range(total)]
    tags, boxes = {}, {}
    pal = palette()
    for index in tqdm(range(total), desc="synth", disable=not progress, unit="image"):
        name = names[index]
        paths = {kind: os.path.join(root, folder, name + ".png") for kind, folder in
                 (("image", "JPEGImages"), ("mask", "segcls"), ("scribble", "scribble"), ("point", "point"),
                  ("box", "box"), ("boxfill", "boxfill"))}
        scene = make_scene(config.seed * 1_000_003 + index, config)
        if not all(os.path.exists(p) for p in paths.values()):
            save_png(paths["mask"], scene["mask"], pal)
            for kind in ("scribble", "point", "box", "boxfill"):
                save_png(paths[kind], scene[kind], pal)
            save_png(paths["image"], scene["image"])      # last: its presence marks the scene complete
        tags[f"JPEGImages/{name}.png"] = scene["tags"]
        boxes[f"JPEGImages/{name}.png"] = scene["boxes"]
    save_json(os.path.join(root, "tags.json"), tags)
    save_json(os.path.join(root, "boxes.json"), boxes)
    save_text(os.path.join(root, "classes.txt"), "\n".join(config.class_names()) + "\n")
    train, val = names[:config.train_images], names[config.train_images:]
    lists = {"scribble": "scribble", "point": "point", "box": "box", "boxfill": "boxfill", "full": "segcls"}
    for list_name, folder in lists.items():
        save_text(os.path.join(root, f"train_{list_name}.txt"),
                  "".join(f"JPEGImages/{n}.png {folder}/{n}.png\n" for n in train))
    save_text(os.path.join(root, "train_tag.txt"), "".join(f"JPEGImages/{n}.png\n" for n in train))
    save_text(os.path.join(root, "val.txt"), "".join(f"JPEGImages/{n}.png segcls/{n}.png\n" for n in val))
    return dict(root=root, train=len(train), val=len(val), classes=config.class_names())
