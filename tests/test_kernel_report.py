"""The static kernel report (benchmarks/kernel_report.py) as a test: the loss
kernels compiled for sm_90a and sm_80 on this CPU at their pinned configs
must not spill, and their main loops (uniform, excluding, column-masked where
the configuration has it, pair-masked) must not grow past the committed
figures (benchmarks/results/kernels.json) nor past the bars (sm_90a, D = 64:
uniform <= 8 instructions and <= 1.05 exps per pair in every kernel;
column-masked <= 12 in the forward, dE and dP - the goal; the exact redo of
flagged rows takes those tiles in its pair-masked loop; excluding and
pair-masked about the committed figures)."""
import json
import os

import pytest

kernel_report = pytest.importorskip("spml_fast.benchmarks.kernel_report")

COMMITTED = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results", "kernels.json")
BARS = {  # per pair, sm_90a: (uniform instructions, uniform exps, excluding, column-masked, pair-masked)
    "forward": (8.0, 1.05, 13.0, 12.0, 22.0), "forward_exact": (8.0, 1.05, 13.0, None, 32.0),
    "grad_embeddings": (8.0, 1.05, 13.0, 12.0, 21.0), "grad_prototypes": (8.0, 1.05, 17.0, 12.0, 32.0)}
CASES = [(kernel, mode, arch, dim) for arch, dims in (("sm90", (64, 128)), ("sm80", (64,)))
         for dim in dims for mode in ("single", "set") for kernel in BARS]


def _tools_missing() -> bool:
    try:
        kernel_report._tools()
        return False
    except RuntimeError:
        return True


pytestmark = pytest.mark.skipif(_tools_missing(), reason="this Triton build ships no ptxas/cuobjdump")


def _committed(kernel, mode, arch, dim):
    with open(COMMITTED) as handle:
        for entry in json.load(handle)["kernels"]:
            if (entry["kernel"], entry["mode"], entry["arch"], entry["dim"]) == (kernel, mode, arch, dim):
                return entry
    raise AssertionError(f"no committed figures for {kernel} {mode} {arch} D={dim}: re-run `spml-fast bench kernels`")


@pytest.fixture(scope="module")
def reports():
    """All cases compiled once (in a child process when the tests run under the interpreter)."""
    return {tuple(case): report for case, report in zip(CASES, kernel_report.report_cases(CASES))}


@pytest.mark.parametrize("kernel,mode,arch,dim", CASES)
def test_kernel_machine_code(reports, kernel, mode, arch, dim):
    report = reports[(kernel, mode, arch, dim)]
    assert report["error"] is None, report["error"]
    assert report["spill_bytes"] == 0 and report["spill_instructions"] == 0, "registers spill"
    from spml_fast.triton_kernels.configs import CONTRAST, _lookup
    column_masked = _lookup(CONTRAST, arch, dim).column_masked and kernel != "forward_exact"  # the redo has none
    assert len(report["loops"]) == (4 if column_masked else 3), \
        "expected the uniform, excluding, column-masked (if the kernel has it) and pair-masked tile loops"
    committed = _committed(kernel, mode, arch, dim)
    assert (report["block_n"], report["block_m"], report["num_warps"]) == (
        committed["block_n"], committed["block_m"], committed["num_warps"]), "pinned config changed: re-run the report"
    for loop, before in zip(report["loops"], committed["loops"]):
        assert loop["per_pair"] <= before["per_pair"] + 0.05, f"loop grew: {loop['per_pair']} > {before['per_pair']}"
        assert loop["mufu_per_pair"] <= before["mufu_per_pair"] + 1e-3
    if arch == "sm90" and dim == 64:
        uniform, exps, excluding, columns, pairs = BARS[kernel]
        loops = report["loops"]
        assert loops[0]["per_pair"] <= uniform and loops[0]["mufu_per_pair"] <= exps
        assert loops[1]["per_pair"] <= excluding and loops[-1]["per_pair"] <= pairs
        if column_masked:
            assert loops[2]["per_pair"] <= columns, f"column-masked loop: {loops[2]['per_pair']} > {columns}"
