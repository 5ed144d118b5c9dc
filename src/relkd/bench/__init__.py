"""Benchmarks: accuracy suites (a grid of methods x pairs x seeds) and their report.

* :func:`run_suite` runs or continues a suite file (``benchmarks/suites/*.yaml``), resumable and
  shareable between processes (``relkd bench accuracy SUITE``).
* :func:`write_report` turns the run folders into ``report.md`` / ``report.html`` with plots and
  the published reference numbers of :mod:`relkd.bench.reference` (``relkd report RUNS_DIR``).
"""

from relkd.bench.accuracy import load_suite, run_suite
from relkd.bench.report import write_report

__all__ = ["load_suite", "run_suite", "write_report"]
