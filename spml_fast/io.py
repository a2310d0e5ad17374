"""Small file helpers: atomic writes (temp file in the same folder, then rename)."""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager

import numpy as np
from PIL import Image


@contextmanager
def atomic_path(path: str):
    """Yield a temp path next to ``path``; on success it is renamed to ``path``."""
    folder = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(folder, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    os.close(handle)
    try:
        yield temp
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)


def save_png(path: str, array: np.ndarray, palette=None) -> None:
    image = Image.fromarray(array)
    if palette is not None:
        image = image.convert("P") if image.mode != "P" else image
        image.putpalette(palette)
    with atomic_path(path) as temp:
        image.save(temp, format="PNG")


def save_json(path: str, data) -> None:
    with atomic_path(path) as temp:
        with open(temp, "w") as out:
            json.dump(data, out, indent=1)


def save_text(path: str, text: str) -> None:
    with atomic_path(path) as temp:
        with open(temp, "w") as out:
            out.write(text)
