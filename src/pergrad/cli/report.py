"""``pergrad report RUN_DIR``: (re)build a run's self-contained ``report.html``.

It reads the run directory that ``pergrad train`` wrote (config.toml, metrics.csv,
checkpoint.pt), recomputes the per-example quantities at the saved parameters, and writes
``report.html`` and ``report_data.json`` there, each atomically.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..report import ReportError, build_report


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``report`` subcommand and its argument; return its parser."""
    parser = subparsers.add_parser(
        "report",
        help="(re)build a run directory's report.html",
        description="Build RUN_DIR/report.html, a self-contained page (loss curves, the noise "
        "scale against the batch size, per-parameter SNR, per-example gradient norms and "
        "outliers, and a check that mini-batch gradients are unbiased), and "
        "RUN_DIR/report_data.json with its numbers, from the files pergrad train wrote. For a run "
        "directory written by a callback of pergrad.integrations (Lightning, the Hugging Face "
        "Trainer), the sections its metrics.csv carries.",
    )
    parser.add_argument(
        "run_dir", type=Path, metavar="RUN_DIR", help="the directory of a pergrad train run (its --out)"
    )
    return parser


def run(args: argparse.Namespace) -> int:
    """Build the report and print its path; return the exit code (2 if the run is unusable)."""
    try:
        report = build_report(args.run_dir)
    except ReportError as err:
        print(f"pergrad report: error: {err}", file=sys.stderr)
        return 2
    print(report)
    return 0
