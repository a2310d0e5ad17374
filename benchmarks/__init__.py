"""spml_fast's benchmark suite (installed as ``spml_fast.benchmarks``).

One script per operation (``bench_loss``, ``bench_primitives``), sharing the
measurement machinery of ``harness``. Every suite runs the baseline (the
dense formulation of the paper's code) in the same run as the tiled
implementation and reports ratios. Entry point: ``spml-fast bench SUITE``.
"""
