"""Package discovery. The design keeps the kernels, the export code and the benchmarks in top-level
folders but installs them under the one import name ``spml_fast``; every package below each folder is
found automatically (``find_packages``), so a new sub-package can never be left out of the wheel.
Everything else (name, dependencies, entry point) is in pyproject.toml."""
from setuptools import find_packages, setup

# import name -> folder in the repository
PACKAGE_ROOTS = {
    "spml_fast": "spml_fast",
    "spml_fast.triton_kernels": "triton_kernels",
    "spml_fast.export": "export",
    "spml_fast.benchmarks": "benchmarks",
}


def discover() -> list[str]:
    """Every package under each root, named under ``spml_fast``."""
    packages = []
    for name, folder in PACKAGE_ROOTS.items():
        packages += [name] + [f"{name}.{sub}" for sub in find_packages(folder)]
    return sorted(set(packages))


if __name__ == "__main__":
    setup(packages=discover(), package_dir=dict(PACKAGE_ROOTS))
