"""``pergrad check``: the mini-batch assumptions, checked on a training setup, as a table."""

from __future__ import annotations

import argparse
import shutil
import sys
import textwrap

from ..train.config import ConfigError
from .train import add_config_arguments, config_from_args


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "check",
        help="check the averaging identity, additivity and random sampling of a training setup",
        description="Check the three assumptions behind mini-batch gradient descent on the setup "
        "'pergrad train' would use with the same settings: the averaging identity and additivity "
        "(no coupling between examples) on a probe batch of the model at its initial weights, and "
        "random sampling on the first epoch's batches. Prints a table: check, result, what it "
        "means. Exit code 0 when all pass, 1 when any fails, 2 on bad input.",
    )
    add_config_arguments(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..train.suite import run_checks

    try:
        rows = run_checks(config_from_args(args))
    except ConfigError as err:
        print(f"pergrad check: error: {err}", file=sys.stderr)
        return 2
    print(format_table(rows, max(100, shutil.get_terminal_size((120, 24)).columns)))
    return 0 if all(row.passed for row in rows) else 1


def format_table(rows, width: int = 120) -> str:
    """Rows as a plain-text table; the 'what it means' column wraps to fit ``width``."""
    name_w = max(len("check"), *(len(r.check) for r in rows))
    result_w = max(len("result"), *(len(_result(r)) for r in rows))
    meaning_w = max(30, width - name_w - result_w - 4)
    lines = [
        f"{'check':<{name_w}}  {'result':<{result_w}}  what it means",
        "-" * min(width, name_w + result_w + 4 + meaning_w),
    ]
    for r in rows:
        wrapped = textwrap.wrap(r.meaning, meaning_w) or [""]
        lines.append(f"{r.check:<{name_w}}  {_result(r):<{result_w}}  {wrapped[0]}")
        lines += [" " * (name_w + result_w + 4) + more for more in wrapped[1:]]
    return "\n".join(lines)


def _result(row) -> str:
    return f"{'pass' if row.passed else 'FAIL'}: {row.result}"
