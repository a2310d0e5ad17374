"""Benchmark output: JSON ``{"env": {...}, "results": [...], "parity": [...]}``,
and a markdown table with ratios against the dense baseline."""
from __future__ import annotations

import json
from dataclasses import asdict
from typing import Iterable

BASELINE = "dense"


def to_json(env: dict, records: Iterable, checks: list[dict], summaries: dict = None) -> str:
    return json.dumps(dict(env=env, results=[asdict(r) for r in records], parity=checks,
                           summaries=summaries or {}), indent=2)


def _fmt_time(record) -> str:
    if record.status != "ok":
        return record.status
    return f"{record.time_s * 1e3:.1f} ({record.time_min_s * 1e3:.1f}-{record.time_max_s * 1e3:.1f})"


def _detail(key: str, value) -> str:
    if key == "plan":       # the Triton kernels' visit plan (bench_loss.visit_plan)
        return (f"kernel tiles visited {value['visited_fraction']:.1%} of a dense sweep ({value['uniform_tiles']} "
                f"unmasked, {value['masked_tiles']} masked of {value['dense_tiles']}, "
                f"{value['block_n']}x{value['block_m']} tiles)")
    return f"{key} = {value:.3g}" if isinstance(value, float) else f"{key} = {value}"


def to_markdown(env: dict, records: list, checks: list[dict], baselines: dict = None,
                summaries: dict = None) -> str:
    """baselines: suite -> the implementation ratios are taken against (default "dense");
    summaries: suite -> extra lines (largest crop under a cap, images/s)."""
    baselines = baselines or {}
    lines = [f"Device: {env['device']} ({env['device_kind']}), {env['threads']} threads, "
             f"torch {env['torch']}, triton {env['triton']}, commit {env['git_commit']}, {env['date']}", "",
             "| suite | case | impl | time ms, median (min-max) | extra peak MiB | speed-up vs baseline | "
             "memory ratio baseline / impl |",
             "|---|---|---|---|---|---|---|"]
    base_records = {(r.suite, r.case): r for r in records
                    if r.impl == baselines.get(r.suite, BASELINE) and r.status == "ok"}
    for record in records:
        base = base_records.get((record.suite, record.case))
        speed = memory = ""
        if base and record.status == "ok" and record is not base:
            speed = f"{base.time_s / record.time_s:.2f}x"
            memory = f"{base.peak_mem_mb / max(record.peak_mem_mb, 1e-3):.1f}x"
        peak = f"{record.peak_mem_mb:.0f}" if record.peak_mem_mb is not None else ""
        lines.append(f"| {record.suite} | {record.case} | {record.impl} | {_fmt_time(record)} | {peak} | "
                     f"{speed} | {memory} |")
    lines += ["", "Baselines: " + ", ".join(f"{suite}: {impl}" for suite, impl in sorted(baselines.items()))
              + "."] if baselines else []
    for suite, extra in (summaries or {}).items():
        if extra:
            lines += ["", f"{suite}:", ""] + extra
    if checks:
        lines += ["", "Parity of each implementation against its baseline on the same inputs:", ""]
        for check in checks:
            detail = ", ".join(_detail(k, v) for k, v in check.items() if k not in ("suite", "case"))
            lines.append(f"- {check['suite']} / {check['case']}: {detail}")
    return "\n".join(lines) + "\n"
