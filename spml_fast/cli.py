"""The ``spml-fast`` command line: one entry point, one subcommand per job."""
from __future__ import annotations

import argparse
import sys


def _add_bench(subparsers) -> None:
    from spml_fast.benchmarks.harness import SUITE_MODULES
    bench = subparsers.add_parser("bench", help="benchmark suites: tiled kernels against the dense baseline")
    bench.add_argument("suite", choices=[*SUITE_MODULES, "all"])
    bench.add_argument("--quick", action="store_true", help="small shapes, about a minute")
    bench.add_argument("--json", metavar="FILE", help="write results as JSON")
    bench.add_argument("--markdown", metavar="FILE", help="write the markdown table")
    bench.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    bench.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement")
    bench.set_defaults(run=run_bench)


def run_bench(args) -> int:
    import torch
    from tqdm import tqdm

    from spml_fast.benchmarks import report
    from spml_fast.benchmarks.harness import SUITE_MODULES, environment, run_suite

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    suites = list(SUITE_MODULES) if args.suite == "all" else [args.suite]
    records, checks = [], []
    with tqdm(desc="bench", unit="measurement", file=sys.stderr) as bar:
        def progress(record):
            bar.set_postfix_str(f"{record.case} {record.impl}: {record.status}")
            bar.update()
        for suite in suites:
            suite_records, suite_checks = run_suite(suite, args.quick, device, args.repeats, progress)
            records += suite_records
            checks += suite_checks
    env = environment(device)
    table = report.to_markdown(env, records, checks)
    print(table)
    if args.json:
        report.write_atomic(args.json, report.to_json(env, records, checks))
    if args.markdown:
        report.write_atomic(args.markdown, table)
    return 0


def _add_demo(subparsers) -> None:
    demo = subparsers.add_parser("demo", help="the main job on built-in data (for now: the loss benchmark, quick)")
    demo.set_defaults(run=run_demo)


def run_demo(args) -> int:
    bench_args = argparse.Namespace(suite="loss", quick=True, json=None, markdown=None, device=None, repeats=None)
    return run_bench(bench_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spml-fast", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_bench(subparsers)
    _add_demo(subparsers)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
