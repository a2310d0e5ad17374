"""The benchmark suite end to end: `spml-fast bench all --quick` (the run a user does first)."""
import json
import os
import subprocess
import sys


def test_bench_all_quick_writes_json_markdown_and_plots(tmp_path):
    out_json, out_md, plots = tmp_path / "bench.json", tmp_path / "bench.md", tmp_path / "plots"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-m", "spml_fast", "bench", "all", "--quick", "--json", str(out_json),
                           "--markdown", str(out_md), "--plots", str(plots)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out_json.read_text())
    assert {"device", "threads", "torch", "triton", "git_commit"} <= set(report["env"])
    records = report["results"]
    for record in records:
        assert {"suite", "case", "impl", "time_s", "peak_mem_mb"} <= set(record)
    ok = {(r["suite"], r["impl"]) for r in records if r["status"] == "ok"}
    assert {("loss", "dense"), ("loss", "tiled"), ("train-step", "dense"), ("train-step", "tiled"),
            ("inference", "pytorch-eager"), ("inference", "onnxruntime"), ("objectives", "pce"),
            ("objectives", "tel-agmm")} <= ok
    loss = {r["impl"]: r for r in records if r["suite"] == "loss" and r["status"] == "ok"}
    assert loss["tiled"]["peak_mem_mb"] < loss["dense"]["peak_mem_mb"]        # same case, same run
    assert all(r["time_min_s"] <= r["time_s"] <= r["time_max_s"] for r in records if r["status"] == "ok")
    assert all(check["status"] == "ok" for check in report["parity"] if check["suite"] in ("loss", "train-step"))
    assert any("largest crop under" in line for line in report["summaries"]["train-step"])
    assert sorted(os.listdir(plots)) == ["inference.png", "loss.png", "objectives.png", "primitives.png",
                                         "train-step.png"]
    objectives = next(check for check in report["parity"] if check["suite"] == "objectives")
    assert objectives["tel-agmm.step.sync"] == 0 and objectives["tel-agmm.tree_energy.aten"] > 0
    assert any("multiple of partial CE" in line for line in report["summaries"]["objectives"])
    markdown = out_md.read_text()
    assert "speed-up vs baseline" in markdown and "images/s" in markdown


def test_roofline_formula_and_device_table():
    from spml_fast.benchmarks.roofline import loss_roofline, peaks
    case = dict(N=1 << 20, M=1 << 14, D=64)
    assert peaks("NVIDIA H100 80GB HBM3") == peaks("NVIDIA H200")
    assert peaks("Some CPU") is None and loss_roofline(case, 1.0, "cpu") is None
    result = loss_roofline(case, 0.01, "NVIDIA H100 80GB HBM3")
    flops = 8 * case["N"] * case["M"] * case["D"]
    assert abs(result["tflops"] - flops / 0.01 / 1e12) < 1e-9
    exp_time = 2 * case["N"] * case["M"] / (132 * 16 * 1.98e9)
    matmul_time = flops / 989e12                      # D = 64: 8.9 ms of tensor-core work, 8.2 ms of exps
    assert result["bound"] == "tensor core" and abs(result["roofline_fraction"] - matmul_time / 0.01) < 1e-12
    narrow = loss_roofline(dict(case, D=16), 0.01, "NVIDIA H100 80GB HBM3")
    assert narrow["bound"] == "exp" and abs(narrow["roofline_fraction"] - exp_time / 0.01) < 1e-12
