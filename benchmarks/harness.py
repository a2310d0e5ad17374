"""Measurement machinery shared by the benchmark scripts.

CPU: every (case, implementation) runs in a fresh Python process, so the peak
resident set of one cannot hide in another's. The process builds its inputs,
takes its anonymous RSS as the idle baseline, runs a warm-up and the
timed repeats, and reports the peak anonymous RSS above the baseline as the
extra memory (file-backed pages, i.e. library code paged in on first use,
excluded; see ``peak_rss_mb``).
CUDA: one process; ``torch.cuda.max_memory_allocated`` above the allocation
before the call, and ``triton.testing.do_bench`` for time.

A suite module provides:
  SUITE: str
  cases(quick: bool, device: str) -> list[dict]       (JSON-serialisable case descriptions)
  IMPLEMENTATIONS: dict[str, callable(case, device) -> callable() ]   (the timed step)
  parity(case, device) -> dict                          (max differences, run once per case)
and optionally:
  BASELINE: str                (the implementation the ratios are taken against; default "dense")
  skip_reason(case, impl, device) -> str | None
  summarize(records, options) -> list[str]    (extra report lines, e.g. the largest crop under a cap)
"""
from __future__ import annotations

import importlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

SUITE_MODULES = {
    "loss": "spml_fast.benchmarks.bench_loss",
    "primitives": "spml_fast.benchmarks.bench_primitives",
    "train-step": "spml_fast.benchmarks.bench_train_step",
    "objectives": "spml_fast.benchmarks.bench_objectives",
    "inference": "spml_fast.benchmarks.bench_inference",
}


def summarize(suite_name: str, records: list, options: dict) -> list[str]:
    """The suite's extra report lines (``summarize(records, options)``), if it has any."""
    module = importlib.import_module(SUITE_MODULES[suite_name])
    return module.summarize(records, options) if hasattr(module, "summarize") else []


def baseline_of(suite_name: str) -> str:
    return getattr(importlib.import_module(SUITE_MODULES[suite_name]), "BASELINE", "dense")


@dataclass
class Record:
    suite: str
    case: str
    impl: str
    time_s: Optional[float] = None        # median over repeats
    time_min_s: Optional[float] = None
    time_max_s: Optional[float] = None
    time_p90_s: Optional[float] = None    # latency percentiles over the repeats
    time_p99_s: Optional[float] = None
    peak_mem_mb: Optional[float] = None   # extra peak memory of the step, MiB
    repeats: int = 0
    status: str = "ok"                    # ok | skipped: ... | oom | error: ...
    params: dict = field(default_factory=dict)


def _proc_status_mb(key: str) -> Optional[float]:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def reset_peak_rss() -> float:
    """Start a new peak window; returns the idle baseline (MiB): anonymous +
    shared-memory RSS now.

    Linux keeps ru_maxrss across execve, so a child started by a parent that
    once held gigabytes would inherit that peak; VmHWM of /proc/self/status
    belongs to this process image and is reset by writing 5 to clear_refs."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        pass
    anonymous, shared = _proc_status_mb("RssAnon"), _proc_status_mb("RssShmem")
    if anonymous is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return anonymous + (shared or 0.0)


def peak_rss_mb() -> float:
    """Peak memory (MiB) since the last reset_peak_rss, without file-backed pages.

    VmHWM counts the shared-library code that the first call of each kernel
    pages in (tens of MiB for libtorch), which is not memory the op uses;
    RssFile only grows, so subtracting its final value never overstates the
    anonymous peak (it can understate it only by code paged in after the peak)."""
    peak, file_backed = _proc_status_mb("VmHWM"), _proc_status_mb("RssFile")
    if peak is None or file_backed is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return peak - file_backed


def environment(device: str) -> dict:
    import triton
    env = {
        "device": torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine()),
        "device_kind": device,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "git_commit": _git_commit(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return env


def _git_commit() -> Optional[str]:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def _time_cpu(step, repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def _percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default) of a small sample."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def measure_in_this_process(suite_module: str, case: dict, impl: str, device: str,
                            repeats: int, warmup: int) -> Record:
    """Build the case, measure one implementation here (the child side on CPU)."""
    suite = importlib.import_module(suite_module)
    record = Record(suite.SUITE, case["name"], impl, params=case)
    try:
        step = suite.IMPLEMENTATIONS[impl](case, device)
        if device == "cuda":
            import triton.testing
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            record.peak_mem_mb = (torch.cuda.max_memory_allocated() - before) / 2**20
            median, low, high, p90, p99 = triton.testing.do_bench(step, warmup=25 * warmup, rep=100 * repeats,
                                                                  quantiles=[0.5, 0.0, 1.0, 0.9, 0.99])
            record.time_s, record.time_min_s, record.time_max_s = median / 1e3, low / 1e3, high / 1e3
            record.time_p90_s, record.time_p99_s = p90 / 1e3, p99 / 1e3
            record.repeats = repeats
        else:
            baseline = reset_peak_rss()
            times = _time_cpu(step, repeats, warmup)
            record.peak_mem_mb = max(0.0, peak_rss_mb() - baseline)
            record.time_s, record.time_min_s, record.time_max_s = statistics.median(times), min(times), max(times)
            record.time_p90_s, record.time_p99_s = _percentile(times, 0.9), _percentile(times, 0.99)
            record.repeats = repeats
    except torch.cuda.OutOfMemoryError:
        record.status = "oom"
    except MemoryError:
        record.status = "oom"
    return record


def measure(suite_module: str, case: dict, impl: str, device: str, repeats: int, warmup: int,
            library: Optional[str] = None) -> Record:
    """Measure one (case, impl); on the CPU in its own process (see module doc). ``library``: a folder
    holding another ``spml_fast`` package to import in that process instead of this one (CPU only; see
    ``compare_revisions``)."""
    if device == "cuda" and library is None:
        record = measure_in_this_process(suite_module, case, impl, device, repeats, warmup)
        torch.cuda.empty_cache()
        return record
    request = json.dumps(dict(suite_module=suite_module, case=case, impl=impl, device=device,
                              repeats=repeats, warmup=warmup))
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)      # timings never run through the interpreter
    if library is not None:
        env["PYTHONPATH"] = os.pathsep.join([library] + env.get("PYTHONPATH", "").split(os.pathsep)).rstrip(os.pathsep)
    done = subprocess.run([sys.executable, "-m", "spml_fast.benchmarks.harness", request],
                          capture_output=True, text=True, env=env, cwd=library)   # cwd: no ./spml_fast ahead of it
    if done.returncode != 0:
        status = "oom" if done.returncode in (-9, 137) else f"error: {done.stderr.strip().splitlines()[-1:]}"
        return Record(case_suite(suite_module), case["name"], impl, status=status, params=case)
    return Record(**json.loads(done.stdout.strip().splitlines()[-1]))


def case_suite(suite_module: str) -> str:
    return importlib.import_module(suite_module).SUITE


def run_suite(name: str, quick: bool, device: str, repeats: Optional[int] = None,
              progress=None, keep_case=None) -> tuple[list[Record], list[dict]]:
    """All cases x implementations of one suite (those ``keep_case(case)`` accepts, when given), plus one
    parity check per case."""
    module_name = SUITE_MODULES[name]
    suite = importlib.import_module(module_name)
    repeats = repeats or getattr(suite, "REPEATS", {}).get(quick) or (2 if quick else 3)
    records, checks = [], []
    for case in suite.cases(quick, device):
        if keep_case is not None and not keep_case(case):
            continue
        for impl in suite.IMPLEMENTATIONS:
            skip = suite.skip_reason(case, impl, device) if hasattr(suite, "skip_reason") else None
            if skip:
                records.append(Record(suite.SUITE, case["name"], impl, status=f"skipped: {skip}", params=case))
            else:
                records.append(measure(module_name, case, impl, device, case.get("repeats", repeats), warmup=1))
            if progress:
                progress(records[-1])
        checks.append(dict(suite=suite.SUITE, case=case["name"], **suite.parity(case, device)))
    return records, checks


def main() -> None:
    """Child entry: measure one request given as JSON on the command line, print one JSON line."""
    request = json.loads(sys.argv[1])
    torch.manual_seed(0)
    record = measure_in_this_process(request["suite_module"], request["case"], request["impl"],
                                     request["device"], request["repeats"], request["warmup"])
    print(json.dumps(asdict(record)))


if __name__ == "__main__":
    main()
