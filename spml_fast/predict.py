"""``spml-fast predict``: label maps of image files, with the PyTorch predictor
(a run plus its bank or classifier head) or an exported model (ONNX or a
TensorRT engine through ``runtime.Segmenter``).

For each readable image ``DIR/<stem>.png`` (label ids as a palette PNG, the
image's size) and ``DIR/<stem>_overlay.png`` (the colours over the image at
half opacity) are written atomically; an unreadable image is reported and
skipped, the rest go on.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Optional, Sequence

import numpy as np

from .data import MAX_PIXELS, DataError, load_image
from .io import atomic_path, save_png
from .overlay import overlay, palette

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def expand_images(paths: Sequence[str]) -> list[str]:
    """Files as given; a folder contributes its image files, sorted."""
    out = []
    for path in paths:
        if os.path.isdir(path):
            out += [os.path.join(path, name) for name in sorted(os.listdir(path))
                    if name.lower().endswith(IMAGE_SUFFIXES)]
        else:
            out.append(path)
    return out


def output_names(paths: Sequence[str]) -> dict:
    """input path -> (label PNG name, overlay PNG name); two inputs that would write one file (a/x.png and
    b/x.png, x.png and x.jpg, y_overlay.png beside y.png) are an error before anything runs."""
    names, writer = {}, {}
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        names[path] = (f"{stem}.png", f"{stem}_overlay.png")
        for name in names[path]:
            if name in writer and writer[name] != path:
                raise ValueError(f"predict: {writer[name]} and {path} would both write {name}; rename one, or "
                                 "predict them into separate --out folders")
            writer[name] = path
    return names


def predict_files(images: Sequence[str], out_dir: str, labeller: Callable[[np.ndarray], np.ndarray],
                  progress: bool = True, class_names: Optional[Sequence[str]] = None,
                  max_pixels: int = MAX_PIXELS) -> tuple[int, list[str]]:
    """Returns (images written, failures as 'path: reason')."""
    from PIL import Image
    from tqdm import tqdm
    paths = expand_images(images)
    names = output_names(paths)
    inputs = {os.path.realpath(p) for p in paths}
    for path, outputs in names.items():
        for name in outputs:
            if os.path.realpath(os.path.join(out_dir, name)) in inputs:
                raise ValueError(f"predict: writing {name} into --out {out_dir} would overwrite an input image")
    os.makedirs(out_dir, exist_ok=True)
    written, failures = 0, []
    for path in tqdm(paths, desc="predict", disable=not progress, unit="image"):
        try:
            image = load_image(path, max_pixels)
        except DataError as error:  # unreadable, missing or over the pixel limit: report, go on
            failures.append(f"{path}: {error}")
            print(f"warning: skipped {path}: {error}", file=sys.stderr)
            continue
        labels = np.asarray(labeller(image)).astype(np.uint8)
        label_name, overlay_name = names[path]
        save_png(os.path.join(out_dir, label_name), labels, palette())
        with atomic_path(os.path.join(out_dir, overlay_name)) as temp:
            Image.fromarray(overlay(image, labels, class_names)).save(temp, format="PNG")
        written += 1
    return written, failures


def make_labeller(checkpoint: Optional[str], bank: Optional[str], classifier: Optional[str],
                  model_file: Optional[str], overrides: Optional[dict] = None, providers: str = "auto",
                  device: Optional[str] = None):
    """(labeller: uint8 [H, W, 3] -> labels [H, W], class names) for ``predict``'s options: exactly one of
    --checkpoint (``predictor.open_predictor``, the run's own settings unless ``overrides`` say otherwise)
    and --model (an exported graph, run as exported)."""
    options = {key: value for key, value in (overrides or {}).items() if value is not None}
    if bool(checkpoint) == bool(model_file):
        raise ValueError("give either --checkpoint RUN (optionally with --bank or --classifier) or --model FILE")
    if model_file:
        given = [f"--{key}" for key in options] + (["--device"] if device else []) + (
            ["--classifier"] if classifier else [])
        if given:
            raise ValueError(f"--model {model_file} runs the graph as it was exported: {', '.join(given)} do not "
                             "apply to it (export again with other settings, or predict from --checkpoint)")
        from .runtime import Segmenter
        if bank:
            from .export.onnx_export import read_metadata
            if not (model_file.endswith(".onnx") and read_metadata(model_file).get("bank_as_input")):
                raise ValueError(f"--bank {bank}: {model_file} has its bank built in (exported without "
                                 "--bank-as-input); it would be ignored")
        segmenter = Segmenter(model_file, providers=providers, bank=bank, batch_size=1)
        return (lambda image: segmenter.predict([image])[0]), segmenter.class_names
    from .predictor import open_predictor
    predictor = open_predictor(checkpoint, bank, classifier, device or "cpu", **options)
    return predictor.label_image, predictor.class_names
