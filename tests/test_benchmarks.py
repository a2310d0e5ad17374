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
            ("inference", "pytorch-eager"), ("inference", "onnxruntime")} <= ok
    loss = {r["impl"]: r for r in records if r["suite"] == "loss" and r["status"] == "ok"}
    assert loss["tiled"]["peak_mem_mb"] < loss["dense"]["peak_mem_mb"]        # same case, same run
    assert all(r["time_min_s"] <= r["time_s"] <= r["time_max_s"] for r in records if r["status"] == "ok")
    assert all(check["status"] == "ok" for check in report["parity"] if check["suite"] in ("loss", "train-step"))
    assert any("largest crop under" in line for line in report["summaries"]["train-step"])
    assert sorted(os.listdir(plots)) == ["inference.png", "loss.png", "primitives.png", "train-step.png"]
    markdown = out_md.read_text()
    assert "speed-up vs baseline" in markdown and "images/s" in markdown
