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
import torch

from .data import MEAN, STD, DataError, load_image
from .io import atomic_path, save_png
from .synth import palette

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


def torch_labeller(model, head, predictor, device="cpu") -> Callable[[np.ndarray], np.ndarray]:
    """uint8 [H, W, 3] -> labels [H, W] by ``inference.predict_labels``."""
    from .inference import predict_labels
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)

    def label(image: np.ndarray) -> np.ndarray:
        tensor = (torch.from_numpy(image).permute(2, 0, 1).float() / 255.0 - mean) / std
        return predict_labels(model, tensor[None].to(device), head, predictor)[0].cpu().numpy()
    return label


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    colours = np.array(palette()[:768], dtype=np.float32).reshape(256, 3)
    return (image.astype(np.float32) * (1 - alpha) + colours[labels] * alpha).round().astype(np.uint8)


def predict_files(images: Sequence[str], out_dir: str, labeller: Callable[[np.ndarray], np.ndarray],
                  progress: bool = True) -> tuple[int, list[str]]:
    """Returns (images written, failures as 'path: reason')."""
    from tqdm import tqdm
    os.makedirs(out_dir, exist_ok=True)
    written, failures = 0, []
    for path in tqdm(expand_images(images), desc="predict", disable=not progress, unit="image"):
        try:
            image = load_image(path)
        except DataError as error:  # unreadable or missing: report, go on with the rest
            failures.append(f"{path}: {error}")
            print(f"warning: skipped {path}: {error}", file=sys.stderr)
            continue
        labels = np.asarray(labeller(image)).astype(np.uint8)
        stem = os.path.splitext(os.path.basename(path))[0]
        save_png(os.path.join(out_dir, f"{stem}.png"), labels, palette())
        from PIL import Image
        with atomic_path(os.path.join(out_dir, f"{stem}_overlay.png")) as temp:
            Image.fromarray(overlay(image, labels)).save(temp, format="PNG")
        written += 1
    return written, failures


def make_labeller(checkpoint: Optional[str], bank: Optional[str], classifier: Optional[str],
                  model_file: Optional[str], predictor, providers: str = "auto", device="cpu"):
    """The labeller for ``predict``'s options (exactly one of --checkpoint and --model)."""
    if bool(checkpoint) == bool(model_file):
        raise ValueError("give either --checkpoint RUN (with --bank or --classifier) or --model FILE")
    if model_file:
        from .runtime import Segmenter
        segmenter = Segmenter(model_file, providers=providers, bank=bank, batch_size=1)
        return lambda image: segmenter.predict([image])[0]
    from spml_fast.export.pipeline import load_deployable
    deployable = load_deployable(checkpoint, bank, classifier, device)
    head = deployable.bank if deployable.bank is not None else deployable.classifier
    from dataclasses import replace
    predictor = replace(predictor, method="classifier") if deployable.bank is None else predictor
    return torch_labeller(deployable.embedding_net.to(device).eval(), head, predictor, device)
