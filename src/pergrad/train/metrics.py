"""The metrics file: one CSV row per logged step, rewritten atomically at every log.

:class:`Column` is the file's schema: the trainer writes rows with these names and the report
reads them back by the same names.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from .._atomic import write_atomic

__all__ = ["Column", "MetricsLog", "read_metrics"]


class Column:
    """The names of the columns of ``metrics.csv``, defined once for the writer and the reader."""

    STEP = "step"
    EPOCH = "epoch"
    EXAMPLES = "examples"  # examples seen so far
    LR = "lr"
    BATCH_SIZE = "batch_size"
    LOSS = "loss"  # mean training loss over the steps since the previous row
    ACCURACY = "accuracy"
    VAL_LOSS = "val_loss"
    VAL_ACCURACY = "val_accuracy"
    B_SIMPLE = "b_simple"  # smoothed B_simple and its interval
    B_SIMPLE_LOW = "b_simple_low"
    B_SIMPLE_HIGH = "b_simple_high"
    B_PRECOND = "b_precond"  # smoothed B_P = tr(PΣ)/GᵀPG in Adam's metric P, and its interval (Adam only)
    B_PRECOND_LOW = "b_precond_low"
    B_PRECOND_HIGH = "b_precond_high"
    B_SIMPLE_TWO_BATCH = "b_simple_two_batch"  # from micro-batch vs. global-batch norms (workers × micro-batches > 1)
    TRACE_SIGMA = "trace_sigma"
    GRAD_SQ_NORM = "grad_sq_norm"
    GRAD_COSINE = "grad_cosine"  # cosine between the recent steps' batch gradients
    NORM_MAX = "norm_max"
    SNR_PREFIX = "snr/"
    NORM_QUANTILES = (("q10", 0.1), ("q50", 0.5), ("q90", 0.9))  # per-example gradient norm quantiles
    INTEGERS = (STEP, EPOCH, EXAMPLES, BATCH_SIZE)
    REQUIRED = (STEP, LOSS)

    @staticmethod
    def norm(label: str) -> str:
        """The column of a per-example gradient norm statistic: a NORM_QUANTILES label or "max"."""
        return f"norm_{label}"

    @staticmethod
    def snr(name: str) -> str:
        """The column of a parameter's signal-to-noise ratio."""
        return Column.SNR_PREFIX + name


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
    """The rows of a metrics file, numbers as float (int for :attr:`Column.INTEGERS`), empty as None."""
    with open(path, newline="") as f:
        rows = []
        for raw in csv.DictReader(f):
            row = {}
            for k, v in raw.items():
                if v == "" or v is None:
                    row[k] = None
                elif k in Column.INTEGERS:
                    row[k] = int(v)
                else:
                    row[k] = float(v)
            rows.append(row)
    return rows
