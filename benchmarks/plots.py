"""PNG plots of a benchmark run (matplotlib, Agg): per suite, time and peak
memory against the problem size on log scales, one line per implementation.
The size is the suite's ``size(case)`` when it has one (train-step: crop side,
inference: pixels per image, loss: N x M), else the case's position."""
from __future__ import annotations

import importlib
import os

from .harness import SUITE_MODULES


def _size(suite: str, case: dict):
    module = importlib.import_module(SUITE_MODULES[suite])
    return module.size(case) if hasattr(module, "size") else None


def write_plots(records: list, out_dir: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from spml_fast.io import atomic_path
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for suite in dict.fromkeys(r.suite for r in records):
        suite_records = [r for r in records if r.suite == suite and r.status == "ok"]
        if not suite_records:
            continue
        name = next(k for k, v in SUITE_MODULES.items() if importlib.import_module(v).SUITE == suite)
        cases = list(dict.fromkeys(r.case for r in records if r.suite == suite))
        sizes = {r.case: _size(name, r.params) for r in records if r.suite == suite}
        numeric = all(v is not None for v in sizes.values()) and len(set(sizes.values())) == len(sizes)
        figure, axes = plt.subplots(1, 2, figsize=(10, 4))
        for impl in dict.fromkeys(r.impl for r in suite_records):
            rows = [r for r in suite_records if r.impl == impl]
            xs = [sizes[r.case] if numeric else cases.index(r.case) + 1 for r in rows]
            axes[0].plot(xs, [r.time_s for r in rows], marker="o", label=impl)
            axes[1].plot(xs, [max(r.peak_mem_mb, 1e-1) for r in rows], marker="o", label=impl)
        for axis, title in zip(axes, ("time per call (s)", "extra peak memory (MiB)")):
            axis.set_yscale("log")
            axis.set_title(f"{suite}: {title}", fontsize=9)
            if numeric:
                axis.set_xscale("log")
                axis.set_xlabel(importlib.import_module(SUITE_MODULES[name]).SIZE_LABEL
                                if hasattr(importlib.import_module(SUITE_MODULES[name]), "SIZE_LABEL") else "size")
            else:
                axis.set_xticks(range(1, len(cases) + 1), cases, rotation=20, fontsize=7)
            axis.grid(True, which="both", alpha=0.3)
            axis.legend(fontsize=7)
        figure.tight_layout()
        path = os.path.join(out_dir, f"{name}.png")
        with atomic_path(path) as temp:
            figure.savefig(temp, dpi=90, format="png")
        plt.close(figure)
        written.append(path)
    return written
