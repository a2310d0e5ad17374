"""Atomic artefacts: permissions from the umask, temp files of dead processes
removed, a folder replaced only once its successor is complete."""
import os
import stat
import subprocess
import sys

import pytest

from spml_fast.io import atomic_directory, atomic_path, remove_stale_temps, save_json


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_artefacts_are_readable_as_the_umask_allows(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    save_json(str(tmp_path / "a.json"), {"x": 1})
    assert _mode(tmp_path / "a.json") == 0o666 & ~umask               # not mkstemp's 0600
    with atomic_directory(str(tmp_path / "repo")) as staging:
        open(os.path.join(staging, "model.onnx"), "w").write("m")
    assert _mode(tmp_path / "repo") == 0o777 & ~umask
    assert _mode(tmp_path / "repo" / "model.onnx") == 0o666 & ~umask


def test_temp_files_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    orphan = tmp_path / f".tmp-{dead}-checkpoint.pt.abc123.pt"
    orphan.write_bytes(b"half")
    mine = tmp_path / f".tmp-{os.getpid()}-other.json.xyz.json"
    mine.write_bytes(b"in progress")
    save_json(str(tmp_path / "b.json"), {})
    assert not orphan.exists() and mine.exists()
    assert remove_stale_temps(str(tmp_path)) == []


def test_failures_leave_the_previous_file_and_folder(tmp_path):
    save_json(str(tmp_path / "c.json"), {"old": True})
    with pytest.raises(RuntimeError):
        with atomic_path(str(tmp_path / "c.json")) as temp:
            open(temp, "w").write('{"new": tr')
            raise RuntimeError("disk full")
    assert open(tmp_path / "c.json").read().startswith('{\n "old": true')
    with atomic_directory(str(tmp_path / "repo")) as staging:
        open(os.path.join(staging, "v1"), "w").write("1")
    with pytest.raises(RuntimeError):
        with atomic_directory(str(tmp_path / "repo")) as staging:
            open(os.path.join(staging, "v2"), "w").write("2")
            raise RuntimeError("parity failed")
    assert os.listdir(tmp_path / "repo") == ["v1"]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]
