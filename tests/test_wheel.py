"""The wheel as users install it: built from the tracked files of the checkout, installed alone into a
new virtual environment (no source tree on the path, no editable finder), every module imported, and a
few-iteration train + eval run from the installed ``spml-fast``. Slow (about 1.5 minutes, most of it
pip installing the dependencies from its cache): `make test` runs it beside the other files."""
import os
import pathlib
import shutil
import subprocess
import sys
import venv

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

IMPORT_EVERY_MODULE = """
import importlib, pkgutil, sys
import spml_fast
failed = []
for info in pkgutil.walk_packages(spml_fast.__path__, "spml_fast."):
    if info.name.endswith("__main__"):
        continue
    try:
        importlib.import_module(info.name)
    except Exception as error:
        failed.append(f"{info.name}: {type(error).__name__}: {error}")
print(spml_fast.__file__)
print("\\n".join(failed) or "imported", len(list(pkgutil.walk_packages(spml_fast.__path__, "spml_fast."))))
sys.exit(1 if failed else 0)
"""


def _tracked_copy(destination: pathlib.Path) -> pathlib.Path:
    """The files git tracks or would track (a clean checkout of this tree), or the tree without build outputs."""
    source = destination / "src"
    try:
        files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, check=True).stdout
        names = [n for n in files.decode().split("\0") if n]
    except (OSError, subprocess.CalledProcessError):
        names = None
    if names is None:
        shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "build", "*.egg-info"))
        return source
    for name in names:
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    return source


def _run(command, cwd, env, timeout=600):
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(map(str, command))} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.mark.timeout(1200)
def test_wheel_installs_alone_and_trains(tmp_path):
    import torch
    source = _tracked_copy(tmp_path)
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", wheels, source],
         tmp_path, os.environ)
    (wheel,) = wheels.glob("spml_fast-*.whl")
    environment = tmp_path / "venv"
    venv.create(environment, with_pip=True)
    python, bin_dir = environment / "bin" / "python", environment / "bin"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    # the torch build this machine uses (the CPU pin where there is no CUDA), then the wheel with its
    # declared dependencies: a missing dependency or package fails here
    _run([python, "-m", "pip", "install", "-q", f"torch=={torch.__version__.split('+')[0]}"], tmp_path, env)
    _run([python, "-m", "pip", "install", "-q", wheel], tmp_path, env)
    work = tmp_path / "work"                     # no source tree in the working directory
    work.mkdir()
    printed = _run([python, "-c", IMPORT_EVERY_MODULE], work, env)
    assert str(environment) in printed.splitlines()[0], printed      # the installed copy, not the checkout
    spml = bin_dir / "spml-fast"
    assert "train" in _run([spml, "--help"], work, env)
    _run([spml, "synth", "--out", "data", "--train-images", "8", "--val-images", "4", "--size", "48"], work, env)
    _run([spml, "train", "--preset", "synthetic-scribble", "--data", "data", "--iterations", "3", "--batch", "2",
          "--crop", "48", "--workers", "0", "--out", "run"], work, env)
    result = _run([spml, "eval", "--checkpoint", "run", "--json", "--crf", "off"], work, env)
    import json
    assert 0.0 <= json.loads(result.strip().splitlines()[-1])["mIoU"] <= 1.0
