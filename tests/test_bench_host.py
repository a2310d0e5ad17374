"""`spml-fast bench host`: the GPU path's host side (every Triton launch a no-op): ATen calls,
synchronising operations and host time per loss call and per SPML step."""
import json
import os
import subprocess
import sys

import pytest

from spml_fast.benchmarks.bench_host import _case, kernels_stubbed, loss_call
from spml_fast.benchmarks.host_cost import HostCost


def test_bench_host_quick_reports_every_case(tmp_path):
    out = tmp_path / "host.json"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-m", "spml_fast", "bench", "host", "--quick", "--json", str(out)],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    records = json.loads(out.read_text())["results"]
    assert [r["case"] for r in records] == ["single-N16k-M1k-bf16", "spml-step-crop128"]
    for record in records:
        assert record["aten_calls"] > 0 and record["host_ms"] > 0
        assert record["sync_ops"] == sum(record["sync_by_op"].values())
    assert "| spml-step-crop128 |" in done.stdout


def test_stubs_are_removed_after_the_block():
    import spml_fast.triton_kernels.pixel_segment_fwd as forward
    from spml_fast.ops import dispatch
    kernel, interpreting = forward.pixel_segment_lse_kernel, dispatch.interpreting
    with kernels_stubbed():
        assert forward.pixel_segment_lse_kernel is not kernel
    assert forward.pixel_segment_lse_kernel is kernel and dispatch.interpreting is interpreting


@pytest.mark.parametrize("mode", ["single", "set", "groups"])
def test_a_loss_call_performs_no_synchronising_operation(mode):
    """Forward + backward of the Triton path with its launches stubbed: nothing reads the device back,
    and the host issues at most 150 ATen operators (the visit plan's three launches are not ATen calls)."""
    with kernels_stubbed():
        call = loss_call(_case("q", 16384, 1024, dtype="bfloat16", images=8, mode=mode))
        call()
        with HostCost() as cost:
            call()
    assert cost.sync_ops == 0 and cost.aten_calls <= 150, (cost.aten_calls, dict(cost.sync_by_op))


def test_the_host_cost_does_not_grow_with_the_problem():
    """The same operators whatever N and M: the plan's sizes come from the shapes, its work from the
    device."""
    counts = []
    for num_pixels, num_segments in ((4096, 256), (65536, 2048)):
        with kernels_stubbed():
            call = loss_call(_case("q", num_pixels, num_segments, dtype="bfloat16", images=8, mode="groups"))
            with HostCost() as cost:
                call()
        counts.append(dict(cost.by_op))
    assert counts[0] == counts[1]


def test_visit_plans_of_a_training_step_are_recorded_per_relation():
    from spml_fast.benchmarks.kernel_report import _fractions, relation_plans
    from spml_fast.ops import pixel_segment_triton
    builder = pixel_segment_triton.build_plan
    plans = relation_plans(side=128, images=2)
    assert pixel_segment_triton.build_plan is builder
    assert sorted(kind for kind, _ in plans) == ["C", "I", "O"]
    for kind, describe in plans:
        assert describe["block_n"] == 64 and describe["block_m"] == 128          # the sm90 tiles
        row = _fractions(kind, describe)
        assert row["visited"] == row["uniform"] + row["excluding"] + row["masked"] <= row["dense"]
        assert 0.0 <= row["masked_of_visited"] <= 1.0 and 0.0 <= row["skipped_of_dense"] <= 1.0
