"""Entry point of the ``pergrad`` command: builds the parser and runs one subcommand.

A subcommand is one module in ``pergrad.cli`` with two functions, listed in ``_COMMANDS``:

* ``add_parser(subparsers)`` adds its ``argparse`` subparser and arguments, and returns it;
* ``run(args) -> int`` does the work and returns the exit code (0 success, 2 bad input).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from pergrad.cli import cbs, check, explain, report, train

_COMMANDS = (train, report, check, explain, cbs)


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line that points to ``--help``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    """The parser for ``pergrad`` with every subcommand in ``_COMMANDS``."""
    parser = _Parser(
        prog="pergrad",
        description="Per-example gradients in one backward pass, "
        "and what mini-batch gradient descent actually averages.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in _COMMANDS:
        command.add_parser(subparsers).set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``pergrad`` with ``argv`` (default: ``sys.argv[1:]``).

    Returns:
        The exit code: 0 on success, 2 on bad input (a one-line message is on stderr).
    """
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as stop:  # argparse stops for --help (0) and for bad arguments (2)
            return int(stop.code or 0)
        return args.run(args)
    except BrokenPipeError:  # the reader went away (pergrad check | head): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so exit's flush cannot fail again
        return 1
