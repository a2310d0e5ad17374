"""Datasets (docs/data.md): SPML list files of images and PNG label maps,
weak annotations turned into pixel labels, over-segmentations (read, or
computed with scikit-image and cached), the image normalisation, and the training
augmentations (docs/method.md, training recipe).

Every random choice of the training pipeline is a pure function of
(seed, epoch, position in the epoch), whatever the worker scheduling, so a
resumed run sees exactly the samples an uninterrupted one would.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .io import save_png

IGNORE = 255
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def normalise(images: torch.Tensor) -> torch.Tensor:
    """Colours [..., 3, H, W] float in [0, 1] -> the network's input, float32 ((x - MEAN) / STD per channel).
    The one place the library normalises images (training, prediction, export parity, benchmarks)."""
    mean = torch.tensor(MEAN, device=images.device).view(3, 1, 1)
    std = torch.tensor(STD, device=images.device).view(3, 1, 1)
    return (images.float() - mean) / std


def denormalise(images: torch.Tensor) -> torch.Tensor:
    """The inverse of ``normalise``: [..., 3, H, W] -> colours in [0, 1] float32 (clamped)."""
    mean = torch.tensor(MEAN, device=images.device).view(3, 1, 1)
    std = torch.tensor(STD, device=images.device).view(3, 1, 1)
    return (images.float() * std + mean).clamp(0, 1)


def image_colours(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Normalised images [B, 3, H, W] -> colours [B, 3, h, w] in [0, 1], area-averaged to ``size``."""
    return torch.nn.functional.adaptive_avg_pool2d(denormalise(images), size)


def image_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> normalised float32 [3, H, W]."""
    return normalise(torch.tensor(image).permute(2, 0, 1).float() / 255.0)


class DataError(ValueError):
    """A missing, unreadable or invalid data file; the message names the file."""


@dataclass(frozen=True)
class Entry:
    image: str                       # absolute paths; label / overseg None when not given
    label: Optional[str] = None
    overseg: Optional[str] = None
    key: str = ""                    # the image path as written in the list (tags.json key)


def resolve_list(root: str, list_file: str) -> str:
    """An absolute list path as given; a relative one is looked up in the data root only (a stray file of
    the same name in the working directory must not change what a command measures)."""
    if os.path.isabs(list_file):
        return list_file
    path = os.path.join(root, list_file)
    if not os.path.isfile(path) and os.path.isfile(list_file):
        raise DataError(f"list file not found: {path} (--list is relative to the data root; "
                        f"for ./{list_file} give its absolute path)")
    return path


def _inside(root: str, path: str) -> bool:
    real_root, real_path = os.path.realpath(root), os.path.realpath(path)
    return os.path.commonpath([real_root, real_path]) == real_root


def read_list(root: str, list_file: str, allow_outside_root: bool = False) -> list[Entry]:
    """SPML list file: ``image [label [overseg]]`` per line, paths relative to ``root``; ``-`` = none.
    A path that leaves the data root (``..``, absolute, a link out) is an error unless
    ``allow_outside_root``."""
    path = resolve_list(root, list_file)
    if not os.path.isfile(path):
        raise DataError(f"list file not found: {path}")
    entries = []
    with open(path) as lines:
        for number, line in enumerate(lines, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) > 3:
                raise DataError(f"{path}:{number}: expected 'image [label [overseg]]', got {len(fields)} fields")
            resolved = [None if f == "-" else os.path.join(root, f) for f in fields] + [None] * (3 - len(fields))
            outside = [f for f, r in zip(fields, resolved) if r is not None and not _inside(root, r)]
            if outside and not allow_outside_root:
                raise DataError(f"{path}:{number}: {outside[0]} lies outside the data root {root} "
                                "(allow it with --allow-outside-root)")
            entries.append(Entry(resolved[0], resolved[1], resolved[2], key=fields[0]))
    if not entries:
        raise DataError(f"list file is empty: {path}")
    return entries


def check_entries(entries: list[Entry], skip_bad: bool = False) -> list[Entry]:
    """Every file of every entry exists, checked before any work starts (not when a worker reaches it):
    an error naming the first missing ones, or with ``skip_bad`` the entries without them dropped."""
    missing = [(entry, path) for entry in entries for path in (entry.image, entry.label, entry.overseg)
               if path is not None and not os.path.isfile(path)]
    if not missing:
        return entries
    names = ", ".join(path for _, path in missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
    if not skip_bad:
        raise DataError(f"{len(missing)} listed file(s) not found: {names} (--skip-bad skips them)")
    warnings.warn(f"skipping {len(missing)} entries whose files are missing: {names}")
    bad = {id(entry) for entry, _ in missing}
    kept = [entry for entry in entries if id(entry) not in bad]
    if not kept:
        raise DataError("every listed image is missing")
    return kept


def read_classes(classes) -> list[str]:
    """``--classes N`` or a file of class names, one per line (index 0 = background)."""
    if isinstance(classes, int) or (isinstance(classes, str) and classes.isdigit()):
        count = int(classes)
        if count < 2:
            raise ValueError(f"--classes must be at least 2, got {count}")
        return ["background"] + [f"class{i}" for i in range(1, count)]
    if not os.path.isfile(classes):
        raise DataError(f"classes file not found: {classes}")
    with open(classes) as names:
        return [n.strip() for n in names if n.strip()]


MAX_PIXELS = 64_000_000        # default pixel limit of a decoded file (8000 x 8000); --max-pixels changes it
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def check_max_pixels(limit: int) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"--max-pixels must be a positive integer, got {limit!r}")
    return limit


def _check_size(image, path: str, kind: str, max_pixels: int) -> None:
    width, height = image.size
    if width * height > max_pixels:
        raise DataError(f"{kind} {path} is {width} x {height} = {width * height:,} pixels, above the limit of "
                        f"{max_pixels:,} (--max-pixels)")


def _rgb(image) -> np.ndarray:
    """A decoded image as uint8 [H, W, 3]: 16-bit greyscale scaled from its 0-65535 range (Pillow's own
    conversion clips it to white), everything else through Pillow's RGB conversion."""
    if image.mode in SIXTEEN_BIT_MODES:
        grey = np.asarray(image, dtype=np.float64)
        grey = np.round(np.clip(grey, 0, 65535) * (255.0 / 65535.0)).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    return np.array(image.convert("RGB"), dtype=np.uint8)


def load_image(path: str, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """RGB uint8 [H, W, 3] (writable). An image above ``max_pixels`` is refused from its header, before
    decoding (a 17 KB PNG can hold 12000 x 12000 pixels): a DataError, like any bad file."""
    try:
        with Image.open(path) as image:
            _check_size(image, path, "image", max_pixels)
            return _rgb(image)
    except FileNotFoundError:
        raise DataError(f"image not found: {path}") from None
    except Image.DecompressionBombError as error:
        raise DataError(f"image {path} refused: {error}") from None
    except (UnidentifiedImageError, OSError, ValueError) as error:
        if isinstance(error, DataError):
            raise
        raise DataError(f"cannot read image {path}: {error}") from None


def load_label(path: str, num_classes: int, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Class id per pixel as uint8, 255 = unlabelled; any other value outside [0, K) is an error (also in a
    16-bit label map: 300 is not clipped to 255)."""
    try:
        with Image.open(path) as image:
            _check_size(image, path, "label map", max_pixels)
            if image.mode in ("P", "L") or image.mode in SIXTEEN_BIT_MODES:
                label = np.asarray(image, dtype=np.int64)
            else:
                label = np.asarray(image.convert("L"), dtype=np.int64)
    except FileNotFoundError:
        raise DataError(f"label map not found: {path}") from None
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
        raise DataError(f"cannot read label map {path}: {error}") from None
    values = np.unique(label)
    bad = values[((values >= num_classes) & (values != IGNORE)) | (values < 0)]
    if bad.size:
        raise DataError(f"label map {path} holds value {int(bad[0])}, outside [0, {num_classes}) and 255")
    return label.astype(np.uint8)


def check_labels(entries: list[Entry], num_classes: int, max_pixels: int = MAX_PIXELS, skip_bad: bool = False,
                 progress: bool = True) -> int:
    """Every label map of a training list read and checked before the first step (values in [0, K) or
    255, readable); returns the labelled pixel count. A list without any labelled pixel is an error: the
    loss would be 0 and nothing would be learnt."""
    from tqdm import tqdm
    labelled = 0
    for entry in tqdm(entries, desc="check labels", unit="map", disable=not progress, leave=False):
        if entry.label is None:
            continue
        try:
            labelled += int((load_label(entry.label, num_classes, max_pixels) != IGNORE).sum())
        except DataError:
            if not skip_bad:
                raise
    if labelled == 0:
        raise DataError("the training list has no labelled pixel (no label maps, or only 255): nothing to learn "
                        "from; give 'image label' lines whose maps hold class ids")
    return labelled


def load_overseg(path: str, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    try:
        with Image.open(path) as image:
            _check_size(image, path, "over-segmentation", max_pixels)
            array = np.asarray(image)
    except FileNotFoundError:
        raise DataError(f"over-segmentation not found: {path}") from None
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
        raise DataError(f"cannot read over-segmentation {path}: {error}") from None
    if array.ndim == 3:  # RGB-encoded region ids
        array = (array[..., 0].astype(np.int64) << 16) | (array[..., 1].astype(np.int64) << 8) | array[..., 2]
    return np.unique(array, return_inverse=True)[1].reshape(array.shape[:2]).astype(np.int64)


@dataclass(frozen=True)
class OversegConfig:
    method: str = "felzenszwalb"     # "felzenszwalb" | "slic"
    scale: float = 60.0              # felzenszwalb
    sigma: float = 0.8
    min_size: int = 20
    segments: int = 100              # slic


def compute_overseg(image: np.ndarray, config: OversegConfig, cache_dir: Optional[str]) -> np.ndarray:
    """Superpixels by scikit-image, cached on disk keyed by image content and parameters."""
    key = hashlib.sha1(image.tobytes() + repr((image.shape, config)).encode()).hexdigest()
    cached = os.path.join(cache_dir, key[:2], key + ".png") if cache_dir else None
    if cached and os.path.exists(cached):
        try:
            return load_overseg(cached)
        except DataError:
            pass                                  # a damaged cache entry is recomputed
    from skimage.segmentation import felzenszwalb, slic
    if config.method == "felzenszwalb":
        regions = felzenszwalb(image, scale=config.scale, sigma=config.sigma, min_size=config.min_size)
    elif config.method == "slic":
        regions = slic(image, n_segments=config.segments, start_label=0)
    else:
        raise ValueError(f"over-segmentation method must be felzenszwalb or slic, got {config.method!r}")
    regions = regions.astype(np.int64)
    if cached:
        save_png(cached, regions.astype(np.uint16))
    return regions


def tags_to_words(tags, num_classes: int) -> np.ndarray:
    """Class ids -> int64 bit set [W], W = ceil(K / 64)."""
    words = np.zeros((num_classes + 63) // 64, dtype=np.int64)
    for cls in tags:
        words[cls // 64] |= np.int64(1) << np.int64(cls % 64)
    return words


@dataclass(frozen=True)
class AugmentConfig:
    crop: int = 96                    # crop size (the paper: 512)
    scale_range: tuple = (0.5, 1.5)
    mirror: bool = True
    # colour augmentation (0 = off), torchvision ColorJitter's meaning: factors drawn in [1 - x, 1 + x],
    # a hue shift in [-hue, hue] turns, and greyscale with probability ``greyscale``
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    greyscale: float = 0.0

    @property
    def colour(self) -> bool:
        return any((self.brightness, self.contrast, self.saturation, self.hue, self.greyscale))

    def __post_init__(self):
        for name in ("brightness", "contrast", "saturation", "greyscale"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"augment.{name} must lie in [0, 1], got {getattr(self, name)}")
        if not 0 <= self.hue <= 0.5:
            raise ValueError(f"augment.hue must lie in [0, 0.5], got {self.hue}")
        if self.crop < 16:
            raise ValueError(f"--crop must be >= 16 pixels, got {self.crop}")
        if not (0 < self.scale_range[0] <= self.scale_range[1]):
            raise ValueError(f"augment.scale_range must be 0 < low <= high, got {self.scale_range}")


class SegmentationDataset(torch.utils.data.Dataset):
    """Samples: image [3, S, S] float (normalised), label [S, S] int64 (255 = unlabelled),
    overseg [S, S] int64 (-1 = padding), valid [S, S] bool (not padding), tags [W] int64
    (image tags, background excluded), index; and whatever ``prepare`` (sample dict -> sample dict,
    picklable) adds, run in the data loader's workers: training adds what its objective reads from the
    augmented sample alone (``objective.sample_preparer``: the maps at the embedding's size and the
    colour tree), so that it costs the workers, not the training step."""

    def __init__(self, entries: list[Entry], num_classes: int, root: str, train: bool = True,
                 augment: AugmentConfig = AugmentConfig(), overseg: OversegConfig = OversegConfig(),
                 seed: int = 0, skip_bad: bool = False, tags_file: Optional[str] = None,
                 max_pixels: int = MAX_PIXELS, prepare=None):
        self.entries, self.num_classes, self.train, self.augment = entries, num_classes, train, augment
        self.prepare = prepare
        self.max_pixels = check_max_pixels(max_pixels)
        self.overseg_config, self.seed, self.skip_bad = overseg, seed, skip_bad
        self.cache_dir = os.path.join(root, ".cache", "overseg")
        tags_file = tags_file or os.path.join(root, "tags.json")
        self.given_tags = {}
        if os.path.exists(tags_file):
            with open(tags_file) as handle:
                self.given_tags = json.load(handle)
        self.epoch = 0

    def __len__(self):
        return len(self.entries)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def load(self, index: int) -> dict:
        """The raw arrays of one entry (no augmentation)."""
        entry = self.entries[index]
        image = load_image(entry.image, self.max_pixels)
        label = (load_label(entry.label, self.num_classes, self.max_pixels) if entry.label
                 else np.full(image.shape[:2], IGNORE, dtype=np.uint8))
        if label.shape != image.shape[:2]:
            raise DataError(f"label map {entry.label} is {label.shape}, image {entry.image} is {image.shape[:2]}")
        regions = (load_overseg(entry.overseg, self.max_pixels) if entry.overseg
                   else compute_overseg(image, self.overseg_config, self.cache_dir))
        if entry.key in self.given_tags:
            tags = [int(t) for t in self.given_tags[entry.key] if 0 < int(t) < self.num_classes]
        else:
            tags = [int(t) for t in np.unique(label) if 0 < t < self.num_classes]
        return dict(image=image, label=label, overseg=regions, tags=tags)

    def __getitem__(self, index: int) -> dict:
        try:
            raw = self.load(index)
        except DataError as error:
            if not self.skip_bad:
                raise
            warnings.warn(f"skipping: {error}")
            return None
        rng = np.random.default_rng([self.seed, self.epoch, index])
        image, label, regions = raw["image"], raw["label"], raw["overseg"]
        valid = np.ones(label.shape, dtype=bool)
        if self.train:
            image, label, regions, valid = _augment(rng, image, label, regions, self.augment)
        sample = dict(image=image_tensor(image).contiguous(), label=torch.from_numpy(label.astype(np.int64)),
                      overseg=torch.from_numpy(regions.astype(np.int64)), valid=torch.from_numpy(valid),
                      tags=torch.from_numpy(tags_to_words(raw["tags"], self.num_classes)), index=index)
        return self.prepare(sample) if self.prepare is not None else sample


def _resize(array: np.ndarray, size: tuple[int, int], nearest: bool) -> np.ndarray:
    height, width = size
    if array.ndim == 3:
        return np.asarray(Image.fromarray(array).resize((width, height), Image.BILINEAR))
    mode_array = array.astype(np.int32)
    return np.asarray(Image.fromarray(mode_array).resize((width, height), Image.NEAREST)).astype(array.dtype)


def _augment(rng, image, label, regions, config: AugmentConfig):
    """Random scale, mirror, and crop-with-pad (image padded with the mean, label 255, overseg -1)."""
    scale = rng.uniform(*config.scale_range)
    height, width = label.shape
    size = (max(1, int(round(height * scale))), max(1, int(round(width * scale))))
    image, label, regions = _resize(image, size, False), _resize(label, size, True), _resize(regions, size, True)
    if config.mirror and rng.random() < 0.5:
        image, label, regions = image[:, ::-1], label[:, ::-1], regions[:, ::-1]
    crop = config.crop
    out_image = np.tile((np.array(MEAN) * 255).astype(np.uint8), (crop, crop, 1))
    out_label = np.full((crop, crop), IGNORE, dtype=np.uint8)
    out_regions = np.full((crop, crop), -1, dtype=np.int64)
    valid = np.zeros((crop, crop), dtype=bool)
    top = int(rng.integers(0, max(1, size[0] - crop) + 1))
    left = int(rng.integers(0, max(1, size[1] - crop) + 1))
    h, w = min(crop, size[0] - top), min(crop, size[1] - left)
    out_image[:h, :w] = image[top:top + h, left:left + w]
    if config.colour:
        out_image[:h, :w] = colour_jitter(rng, out_image[:h, :w], config)
    out_label[:h, :w] = label[top:top + h, left:left + w]
    out_regions[:h, :w] = regions[top:top + h, left:left + w]
    valid[:h, :w] = True
    return out_image, out_label, out_regions, valid


def colour_jitter(rng, image: np.ndarray, config: AugmentConfig) -> np.ndarray:
    """uint8 [h, w, 3] -> uint8 [h, w, 3]: brightness, contrast, saturation, hue, then greyscale, each drawn
    from ``rng`` only when enabled (a run without them draws the same numbers as before they existed)."""
    from skimage.color import hsv2rgb, rgb2hsv
    out = image.astype(np.float32) / 255.0
    grey = lambda x: (x @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[..., None]
    if config.brightness:
        out = out * rng.uniform(1 - config.brightness, 1 + config.brightness)
    if config.contrast:
        out = (out - grey(out).mean()) * rng.uniform(1 - config.contrast, 1 + config.contrast) + grey(out).mean()
    if config.saturation:
        out = (out - grey(out)) * rng.uniform(1 - config.saturation, 1 + config.saturation) + grey(out)
    out = out.clip(0, 1)
    if config.hue:
        hsv = rgb2hsv(out)
        hsv[..., 0] = (hsv[..., 0] + rng.uniform(-config.hue, config.hue)) % 1.0
        out = hsv2rgb(hsv).astype(np.float32)
    if config.greyscale and rng.random() < config.greyscale:
        out = np.repeat(grey(out), 3, axis=2)
    return (out.clip(0, 1) * 255).round().astype(np.uint8)


def collate(samples: list) -> dict:
    samples = [s for s in samples if s is not None]
    if not samples:
        return None
    return {key: (torch.stack([s[key] for s in samples]) if key != "index" else
                  torch.tensor([s[key] for s in samples])) for key in samples[0]}


class EpochSampler(torch.utils.data.Sampler):
    """Permutation per epoch from (seed, epoch); ``start`` skips what a resumed run already consumed."""

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.size, self.seed, self.rank, self.world_size = size, seed, rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def indices(self) -> list[int]:
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        usable = self.size - self.size % self.world_size
        return order[self.rank:usable:self.world_size].tolist()

    def __iter__(self):
        return iter(self.indices()[self.start:])

    def __len__(self):
        return max(0, len(self.indices()) - self.start)
