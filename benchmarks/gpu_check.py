"""``make gpu-check``: every check that needs a GPU, in one command sized for
a short borrowed window (about 6 minutes on an H100/H200, machine start not
included):

1. first-call compile time of the loss kernels per label mode, in a fresh
   process with an empty Triton cache (forward + backward at N = 262,144,
   M = 8,192, bf16; the second call's time is subtracted);
2. the GPU tests: compiled kernels against the dense reference in every mode
   (tests/test_gpu_kernels.py: bf16/fp16 through the tensor cores at ragged
   sizes, kappa = 64, fp16 at M = 8,192, bits of two fresh processes; and
   the op, plan and nearest-prototype tests on CUDA tensors);
3. ``bench loss`` at GPU sizes (dense, torch.compile of dense, tiled) and
   ``bench train-step`` at crops 512, 1024 and 2048;
4. a report ``<out>/<device>.md`` and ``.json`` (device name in lower case,
   e.g. ``nvidia-h100-80gb-hbm3``).

    python -m spml_fast.benchmarks.gpu_check [--out benchmarks/results] [--skip-tests]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_TESTS = ["tests/test_gpu_kernels.py", "tests/test_pixel_segment_loss_forward.py",
             "tests/test_pixel_segment_loss_backward.py", "tests/test_pixel_segment_loss_plan.py",
             "tests/test_nearest_prototype.py"]
TRAIN_STEP_CROPS = (512, 1024, 2048)

FIRST_CALL = r"""
import json, sys, time, torch
from spml_fast.benchmarks.bench_loss import _case, make_inputs
from spml_fast import pixel_segment_loss
case = _case("compile", 262144, 8192, mode=sys.argv[1], dtype="bfloat16", images=8)
inputs = make_inputs(case, "cuda")
e, p = inputs.pop("embeddings").requires_grad_(), inputs.pop("prototypes").requires_grad_()
times = []
for _ in range(2):
    torch.cuda.synchronize(); start = time.perf_counter()
    loss = pixel_segment_loss(e, p, backend="triton", **inputs)
    torch.autograd.grad(loss, (e, p))
    torch.cuda.synchronize(); times.append(time.perf_counter() - start)
print(json.dumps(dict(first_s=times[0], second_s=times[1])))
"""


def device_slug() -> str:
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


def compile_times() -> dict:
    """mode -> {first_s, second_s, compile_s} from fresh processes with empty Triton caches."""
    results = {}
    for mode in ("single", "set", "groups"):
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, TRITON_CACHE_DIR=cache)
            env.pop("TRITON_INTERPRET", None)
            done = subprocess.run([sys.executable, "-c", FIRST_CALL, mode], capture_output=True, text=True, env=env,
                                  cwd=ROOT, timeout=300)
        if done.returncode != 0:
            results[mode] = dict(error=done.stderr.strip().splitlines()[-1:])
            continue
        timing = json.loads(done.stdout.strip().splitlines()[-1])
        results[mode] = dict(timing, compile_s=timing["first_s"] - timing["second_s"])
    return results


def run_tests() -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *GPU_TESTS],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=420)
    summary = [line for line in done.stdout.splitlines() if re.search(r"\d+ (passed|failed)", line)]
    return dict(returncode=done.returncode, summary=summary[-1] if summary else done.stdout[-500:],
                seconds=round(time.perf_counter() - start, 1),
                failures=[line for line in done.stdout.splitlines() if line.startswith("FAILED")])


def run_benchmarks() -> tuple[list, list, dict, str]:
    from . import report
    from .harness import baseline_of, environment, run_suite, summarize
    records, checks = [], []
    for suite, keep in (("loss", None), ("train-step", lambda case: case["crop"] in TRAIN_STEP_CROPS)):
        suite_records, suite_checks = run_suite(suite, False, "cuda", keep_case=keep)
        records += suite_records
        checks += suite_checks
    env = environment("cuda")
    options = dict(memory_cap_mb=8192, device=env["device"], device_kind="cuda")
    summaries = {suite: summarize(suite, [r for r in records if r.suite == suite], options)
                 for suite in ("loss", "train-step")}
    table = report.to_markdown(env, records, checks, {s: baseline_of(s) for s in ("loss", "train-step")}, summaries)
    return records, checks, dict(env=env, summaries=summaries), table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--skip-tests", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device visible; nothing to check here", file=sys.stderr)
        return 2
    from dataclasses import asdict

    from spml_fast.io import save_text
    started = time.perf_counter()
    compiles = compile_times()
    print("compile:", json.dumps(compiles), flush=True)
    tests = None if args.skip_tests else run_tests()
    print("tests:", json.dumps(tests), flush=True)
    records, checks, meta, table = run_benchmarks()
    slug = device_slug()
    lines = [f"# GPU check: {meta['env']['device']}", "", f"`make gpu-check` at commit {meta['env']['git_commit']}, "
             f"{time.perf_counter() - started:.0f} s in all.", "", "## First call (compile) per mode", "",
             "| mode | first call s | second call s | compile s |", "|---|---|---|---|"]
    for mode, timing in compiles.items():
        if "error" in timing:
            lines.append(f"| {mode} | error: {timing['error']} | | |")
        else:
            lines.append(f"| {mode} | {timing['first_s']:.2f} | {timing['second_s']:.4f} | {timing['compile_s']:.2f} |")
    if tests is not None:
        lines += ["", "## GPU tests", "", f"`pytest {' '.join(GPU_TESTS)}`: {tests['summary']} "
                  f"({tests['seconds']} s)"] + [f"- {failure}" for failure in tests["failures"]]
    lines += ["", "## Benchmarks", "", table]
    save_text(os.path.join(args.out, f"{slug}.md"), "\n".join(lines) + "\n")
    save_text(os.path.join(args.out, f"{slug}.json"), json.dumps(dict(
        compile=compiles, tests=tests, env=meta["env"], summaries=meta["summaries"],
        results=[asdict(r) for r in records], parity=checks), indent=1) + "\n")
    print("\n".join(lines))
    return 0 if (tests is None or tests["returncode"] == 0) else 1


if __name__ == "__main__":
    sys.exit(main())
