"""Package layout (the product's design): one top-level import name, sub-packages mapped in."""
import pathlib
import subprocess
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_only_spml_fast_is_installed_top_level():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["packages"] and all(p == "spml_fast" or p.startswith("spml_fast.") for p in config["packages"])
    assert config["package-dir"]["spml_fast.triton_kernels"] == "triton_kernels"
    assert config["package-dir"]["spml_fast.export"] == "export"


def test_subpackages_import_from_their_folders():
    import spml_fast.export
    import spml_fast.triton_kernels.utils
    assert pathlib.Path(spml_fast.triton_kernels.utils.__file__).parent == ROOT / "triton_kernels"
    assert pathlib.Path(spml_fast.export.__file__).parent == ROOT / "export"
    assert callable(spml_fast.pixel_segment_loss)


def test_cli_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "spml_fast", "--help"], capture_output=True, text=True, check=True)
    for command in ("bench", "demo", "bank", "export", "predict", "train-classifier"):
        assert command in out.stdout
