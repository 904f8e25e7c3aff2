"""MkDocs hook: replace ``<!-- pergrad-help: COMMAND -->`` with that subcommand's ``--help``.

The CLI page then shows the parser's own text, so it cannot drift from the code.
"""

from __future__ import annotations

import contextlib
import io
import os
import re

_MARKER = re.compile(r"<!-- pergrad-help: (\w+) -->")


def _help(command: str) -> str:
    from pergrad.cli.main import build_parser

    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal's width
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        build_parser().parse_args([command, "--help"])
    return out.getvalue()


def on_page_markdown(markdown: str, **kwargs) -> str:
    return _MARKER.sub(lambda m: "```text\n" + _help(m.group(1)) + "```", markdown)
