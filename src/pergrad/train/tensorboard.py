"""TensorBoard event files beside ``metrics.csv``: ``pergrad train --tensorboard``.

Every logged row becomes scalars named as its columns (``b_simple``, ``snr/0.weight``…) at its
step, and the per-example gradient norms of the row's steps a histogram ``norms``. TensorBoard's
event files are append-only logs, not rewritten atomically; on resume the writer drops the events
after the checkpoint's step (``purge_step``), as the metrics file drops its rows.
"""

from __future__ import annotations

import math
from pathlib import Path

from .config import ConfigError
from .metrics import Column

__all__ = ["TensorBoardLog", "HISTOGRAM"]

HISTOGRAM = "norms"  # the tag of the per-example gradient norm histogram


class TensorBoardLog:
    """Writes the rows of a run as TensorBoard scalars and norm histograms.

    Args:
        run_dir: the run directory, where the event files go.
        resume_step: the checkpoint's step when resuming (events after it are dropped), else None.

    Raises:
        ConfigError: the ``tensorboard`` package is not installed, with how to install it.
    """

    def __init__(self, run_dir: str | Path, resume_step: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "--tensorboard needs the tensorboard package: pip install 'pergrad[tensorboard]' (tensorboard==2.21.0)"
            ) from None
        purge = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(log_dir=str(run_dir), purge_step=purge)

    def add(self, row: dict, norms: list[float]) -> None:
        """One metrics row ({column: value}, None for empty) and its steps' per-example norms."""
        step = row[Column.STEP]
        for column, value in row.items():
            if column != Column.STEP and value is not None and not math.isnan(float(value)):
                self.writer.add_scalar(column, float(value), step)
        if norms:
            import numpy as np

            self.writer.add_histogram(HISTOGRAM, np.asarray(norms, dtype=np.float64), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
