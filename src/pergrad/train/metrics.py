"""The metrics file: one CSV row per logged step, rewritten atomically at every log."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from .._atomic import write_atomic

__all__ = ["MetricsLog", "read_metrics"]


class MetricsLog:
    """Rows of named values; columns are the union of the rows' keys, in first-seen order.

    The whole file is rewritten atomically at each :meth:`append`, so a crash leaves the
    previous complete file, never a half-written row. Missing values are empty cells.
    """

    def __init__(self, path: str | Path, rows: list[dict] | None = None):
        self.path = Path(path)
        self.rows: list[dict] = list(rows or [])

    def append(self, row: dict) -> None:
        self.rows.append(row)
        self.flush()

    def flush(self) -> None:
        columns: dict[str, None] = {}
        for row in self.rows:
            columns.update(dict.fromkeys(row))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(columns), restval="", lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: _cell(v) for k, v in row.items()})
        write_atomic(self.path, buffer.getvalue())


def _cell(value) -> str:
    if value is None:
        return ""
    return repr(value) if isinstance(value, float) else str(value)  # repr: exact, and 'inf'/'nan' as such


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics file, numbers as float (int for step/epoch/examples), empty as None."""
    with open(path, newline="") as f:
        rows = []
        for raw in csv.DictReader(f):
            row = {}
            for k, v in raw.items():
                if v == "" or v is None:
                    row[k] = None
                elif k in ("step", "epoch", "examples", "batch_size"):
                    row[k] = int(v)
                else:
                    row[k] = float(v)
            rows.append(row)
    return rows
