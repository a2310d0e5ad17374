"""File helpers: every artefact is written atomically.

``atomic_path`` hands out a temp file beside the target (same folder, so
the rename is atomic), and on success gives it the permissions a plain
``open`` would (0666 minus the umask: a server running as another user can
read checkpoints, banks and models), flushes it to disk, renames it over the
target and flushes the folder. On any error the target is untouched. Temp
files are named ``.tmp-<pid>-<target>.<random>``; those left by a process
that no longer runs (a killed run) are removed the next time that folder is
written. ``atomic_directory`` does the same for a folder (a Triton model
repository): the old one stays until the new one is complete.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager

import numpy as np
from PIL import Image

_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK
DIRECTORY_MODE = 0o777 & ~_UMASK


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:          # alive, another user's
        return True
    return True


def remove_stale_temps(folder: str) -> list[str]:
    """Remove ``.tmp-*`` files and folders in ``folder`` whose writing process is gone; returns their names."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(".tmp-"):
            continue
        pid = name[len(".tmp-"):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or _process_alive(int(pid)):
            continue
        path = os.path.join(folder, name)
        try:
            shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
            removed.append(name)
        except OSError:
            pass
    return removed


def _fsync(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _temp_prefix(path: str) -> str:
    return f".tmp-{os.getpid()}-{os.path.basename(path)}."


@contextmanager
def atomic_path(path: str):
    """Yield a temp path next to ``path``; on success it replaces ``path`` (see the module doc)."""
    folder = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(folder, exist_ok=True)
    remove_stale_temps(folder)
    handle, temp = tempfile.mkstemp(dir=folder, prefix=_temp_prefix(path), suffix=os.path.splitext(path)[1])
    os.close(handle)
    try:
        yield temp
        os.chmod(temp, FILE_MODE)
        _fsync(temp)
        os.replace(temp, path)
        _fsync(folder)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)


@contextmanager
def atomic_directory(path: str):
    """Yield an empty temp folder next to ``path``; on success it replaces ``path`` (the old folder is
    removed only once the new one is in place)."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    remove_stale_temps(parent)
    staging = tempfile.mkdtemp(dir=parent, prefix=_temp_prefix(path))
    try:
        yield staging
        for root, folders, files in os.walk(staging):
            os.chmod(root, DIRECTORY_MODE)
            for name in files:
                os.chmod(os.path.join(root, name), FILE_MODE)
                _fsync(os.path.join(root, name))
        retired = None
        if os.path.exists(path):
            retired = tempfile.mkdtemp(dir=parent, prefix=_temp_prefix(path) + "old.")
            os.rmdir(retired)
            os.replace(path, retired)
        os.replace(staging, path)
        _fsync(parent)
        if retired:
            shutil.rmtree(retired, ignore_errors=True)
    finally:
        if os.path.exists(staging):
            shutil.rmtree(staging, ignore_errors=True)


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


def file_sha256(path: str) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
