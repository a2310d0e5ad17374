"""Colours of label maps: the palette of the label PNGs (the built-in data's and ``predict``'s) and the
overlay of a prediction on its image, with a legend. Light on purpose (NumPy and Pillow only): the
commands that draw do not import the data generator or the network code."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def palette() -> list[int]:
    """768 ints: RGB of label ids 0-255 (0 black, 1-5 distinct colours, the rest white)."""
    colours = [(0, 0, 0), (220, 60, 60), (60, 200, 60), (60, 90, 220), (230, 190, 40), (200, 60, 200)]
    flat = [c for colour in colours for c in colour]
    return flat + [255, 255, 255] * (256 - len(colours))


def overlay(image: np.ndarray, labels: np.ndarray, class_names: Optional[Sequence[str]] = None,
            alpha: float = 0.5) -> np.ndarray:
    """The label colours over the image at ``alpha``, with a legend of the classes present when their
    names are known."""
    colours = np.array(palette()[:768], dtype=np.float32).reshape(256, 3)
    blended = (image.astype(np.float32) * (1 - alpha) + colours[labels] * alpha).round().astype(np.uint8)
    if not class_names:
        return blended
    from PIL import Image, ImageDraw
    canvas = Image.fromarray(blended)
    draw = ImageDraw.Draw(canvas)
    present = [int(c) for c in np.unique(labels) if int(c) < len(class_names)]
    for row, cls in enumerate(present):
        top = 2 + 12 * row
        if top + 10 > canvas.height:
            break
        draw.rectangle([2, top, 11, top + 9], fill=tuple(int(v) for v in colours[cls]), outline=(255, 255, 255))
        draw.text((14, top - 1), str(class_names[cls]), fill=(255, 255, 255), stroke_width=1, stroke_fill=(0, 0, 0))
    return np.asarray(canvas)
