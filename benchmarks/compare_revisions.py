"""One benchmark suite's cases for two revisions of the library, in the same run.

    python -m spml_fast.benchmarks.compare_revisions --base f4715ed [--suite loss] [--impl tiled] [--rounds 3]

The base revision is taken from git (``git archive``) into a temporary folder
laid out as the installed package (``triton_kernels/``, ``export/`` and
``benchmarks/`` under ``spml_fast/``); every measurement runs in a fresh
process (the harness's CPU protocol), the base importing that copy and the
current one this working tree, the two alternating case by case and round by
round so that a change in the machine's load falls on both. The table gives
each case's median time per revision and the ratio current / base (below 1:
the current revision is faster). The cases are the current suite's; the base
must accept them (its suite module builds the inputs).
"""
from __future__ import annotations

import argparse
import importlib
import io
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile

from .harness import SUITE_MODULES, measure

SUBPACKAGES = ("triton_kernels", "export", "benchmarks")     # top-level folders installed under spml_fast


def checkout(revision: str, repository: str, into: str) -> str:
    """Write ``revision`` of ``repository`` under ``into`` in the installed layout; returns the import folder."""
    archive = subprocess.run(["git", "-C", repository, "archive", "--format=tar", revision],
                             capture_output=True, check=True).stdout
    source = os.path.join(into, "source")
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(source, filter="data")
    library = os.path.join(into, "library")
    shutil.copytree(os.path.join(source, "spml_fast"), os.path.join(library, "spml_fast"))
    for name in SUBPACKAGES:
        if os.path.isdir(os.path.join(source, name)):
            shutil.copytree(os.path.join(source, name), os.path.join(library, "spml_fast", name))
    imported = subprocess.run([sys.executable, "-c", "import spml_fast; print(spml_fast.__file__)"], cwd=library,
                              env=dict(os.environ, PYTHONPATH=library), capture_output=True, text=True).stdout.strip()
    if not imported.startswith(library):      # an installed or ./spml_fast would shadow the base revision
        raise RuntimeError(f"the base revision's copy is not what a child process imports (it imports {imported!r})")
    return library


def compare(base: str, suite: str = "loss", impl: str = "tiled", rounds: int = 3, quick: bool = False,
            repository: str = ".") -> list[dict]:
    """[{case, base_s, current_s, ratio}] with the median over ``rounds`` fresh-process measurements each."""
    module = SUITE_MODULES[suite]
    cases = importlib.import_module(module).cases(quick, "cpu")
    times = {(case["name"], side): [] for case in cases for side in ("base", "current")}
    with tempfile.TemporaryDirectory(prefix="spml-base-") as folder:
        library = checkout(base, repository, folder)
        for round_index in range(rounds):
            for case in cases:
                order = (("base", library), ("current", None))
                for side, path in order if round_index % 2 == 0 else order[::-1]:
                    record = measure(module, case, impl, "cpu", repeats=1, warmup=1, library=path)
                    if record.status != "ok":
                        raise RuntimeError(f"{side} revision, case {case['name']}: {record.status}")
                    times[(case["name"], side)].append(record.time_s)
    rows = []
    for case in cases:
        base_s = statistics.median(times[(case["name"], "base")])
        current_s = statistics.median(times[(case["name"], "current")])
        rows.append(dict(case=case["name"], base_s=base_s, current_s=current_s, ratio=current_s / base_s,
                         base_runs=times[(case["name"], "base")], current_runs=times[(case["name"], "current")]))
    return rows


def to_markdown(rows: list[dict], base: str, suite: str, impl: str) -> str:
    lines = [f"{suite} / {impl}, CPU: base {base} against the working tree (median of fresh-process runs)", "",
             "| case | base | current | current / base |", "|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['base_s']:.3f} s | {r['current_s']:.3f} s | {r['ratio']:.2f} |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--base", required=True, help="git revision to compare against (commit, tag, branch)")
    parser.add_argument("--suite", default="loss", choices=sorted(SUITE_MODULES), help="benchmark suite")
    parser.add_argument("--impl", default="tiled", help="implementation of the suite to time")
    parser.add_argument("--rounds", type=int, default=3, help="fresh-process measurements per case and revision")
    parser.add_argument("--quick", action="store_true", help="the suite's small cases")
    parser.add_argument("--repository", default=".", help="git repository holding --base")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    rows = compare(args.base, args.suite, args.impl, args.rounds, args.quick, args.repository)
    print(to_markdown(rows, args.base, args.suite, args.impl))


if __name__ == "__main__":
    main()
