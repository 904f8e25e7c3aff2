"""``pergrad cbs``: measure the critical batch size and set it beside the noise scale.

With the settings of ``pergrad train`` (flags or ``--config``) it trains the reference run in
``--out``, sweeps batch sizes × learning rates × seeds to a target loss (McCandlish et al. 2018),
branches from the reference at larger batches (Merrill et al. 2025), writes ``cbs.json`` and
builds the report, whose "Critical batch size" section shows the result
(:mod:`pergrad.train.cbs`). Jobs run in parallel processes; run the same command again to
resume an interrupted measurement.
"""

from __future__ import annotations

import argparse
import sys

from ..train.checkpoint import CheckpointError
from ..train.config import ConfigError
from .train import add_config_arguments, config_from_args


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "cbs",
        help="measure the critical batch size (batch-size sweep and branches) beside B_simple",
        description="Train a reference run with the settings of 'pergrad train' in --out, then "
        "sweep batch sizes (powers of two) x learning rates x seeds to a target validation loss "
        "and fit S = S_min (1 + B_crit/B) (McCandlish et al. 2018); branch from the reference's "
        "checkpoints at k x its batch size for B*(t) (Merrill et al. 2025). Writes OUT/cbs.json and "
        "OUT/report.html. Run the same command again to resume.",
    )
    add_config_arguments(parser)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smaller sweep: every other batch size, 2 seeds, 2 branch points (3 learning rates, as the full one)",
    )
    parser.add_argument(
        "--jobs", type=int, default=None, metavar="N", help="parallel training processes (default: the available cores)"
    )
    parser.add_argument("--seeds", type=int, default=None, metavar="N",
                        help="seeds per batch size and learning rate, >= 2 (default: 3, quick: 2)")  # fmt: skip
    parser.add_argument("--target-loss", type=float, default=None, metavar="LOSS",
                        help="validation loss to reach (default: the reference run's at half its steps)")  # fmt: skip
    parser.add_argument("--second-target-loss", type=float, default=None, metavar="LOSS",
                        help="a second, easier (higher) validation loss where B_crit is measured too "
                        "(default: the reference run's at a quarter of its steps)")  # fmt: skip
    parser.add_argument("--tolerance", type=float, default=None, metavar="T",
                        help="a branch at k x B passes while its loss is at most (1 + T) x the k = 1 "
                        "branch's (default: 0.1)")  # fmt: skip
    return parser


def run(args: argparse.Namespace) -> int:
    from ..report import ReportError, build_report
    from ..train.cbs import TOLERANCE, default_workers, make_plan, run_cbs

    try:
        if args.jobs is not None and args.jobs < 1:
            raise ConfigError(f"--jobs must be at least 1, got {args.jobs}")
        config = config_from_args(args)
        tolerance = TOLERANCE if args.tolerance is None else args.tolerance
        plan = make_plan(config, quick=args.quick, seeds=args.seeds, target_loss=args.target_loss, tolerance=tolerance,
                         second_target=args.second_target_loss)  # fmt: skip
        summary = run_cbs(config, plan, workers=args.jobs or default_workers())
        report = build_report(config.out)
    except (ConfigError, CheckpointError, ReportError) as err:
        print(f"pergrad cbs: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pergrad cbs: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    print(_summary_line(summary))
    print(f"report: {report}")
    return 0


def _summary_line(summary: dict) -> str:
    from ..report._format import number

    if summary["b_crit"] is None:
        return "B_crit: not measured (fewer than two batch sizes reached the target)"
    low, high = summary["b_crit_interval"] or (float("nan"), float("nan"))
    line = f"B_crit = {number(summary['b_crit'])} (interval {number(low)}-{number(high)})"
    if summary["b_simple"] is not None:
        line += f", B_simple = {number(summary['b_simple'])}"
    if summary.get("b_precond") is not None:
        line += f", B_P = {number(summary['b_precond'])}"
    if summary["ratio"] is not None:
        line += f", B_simple / B_crit = {number(summary['ratio'])}"
    return line
