"""Read a run directory written by ``pergrad train``: its config, metrics and checkpoint.

Every problem becomes a :class:`ReportError` whose message names the file, what is wrong with
it, and what to do, so that ``pergrad report`` can print it as one line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from ..errors import PergradError
from ..train.checkpoint import CheckpointError, load_checkpoint
from ..train.config import ConfigError, TrainConfig
from ..train.data import Dataset, load_dataset
from ..train.metrics import Column, read_metrics
from ..train.models import build_model

__all__ = ["ReportError", "Metrics", "Run", "load_metrics", "load_run", "load_data_and_model"]


class ReportError(PergradError, ValueError):
    """A run directory the report cannot be built from; the message says what to do."""


@dataclass(frozen=True)
class Metrics:
    """The rows of ``metrics.csv`` as columns.

    Attributes:
        rows: one dict per logged step, as :func:`pergrad.train.metrics.read_metrics` reads
            them (numbers, ``None`` for an empty cell, ``inf`` kept).
        names: the columns, in file order.
    """

    rows: list[dict]
    names: tuple[str, ...]

    def column(self, name: str) -> np.ndarray:
        """(rows,) float64 values of a column; NaN where a cell is empty or the column absent."""
        return np.array(
            [np.nan if row.get(name) is None else float(row[name]) for row in self.rows],
            dtype=np.float64,
        )

    def has(self, name: str) -> bool:
        """Whether the column exists and has at least one value."""
        return name in self.names and any(row.get(name) is not None for row in self.rows)

    def last(self, name: str) -> tuple[float | None, int | None]:
        """The last logged value of a column and its step, or (None, None) if it has none."""
        for row in reversed(self.rows):
            if row.get(name) is not None:
                return float(row[name]), int(row[Column.STEP])
        return None, None

    @property
    def snr_names(self) -> list[str]:
        """Parameter names with an SNR column (``snr/<name>``), in file order."""
        return [c[len(Column.SNR_PREFIX) :] for c in self.names if c.startswith(Column.SNR_PREFIX)]


@dataclass(frozen=True)
class Run:
    """A run directory's contents.

    Attributes:
        path: the run directory.
        config: its ``config.toml``.
        metrics: its ``metrics.csv``.
        checkpoint: its ``checkpoint.pt`` (a dict with at least "model" and "step").
    """

    path: Path
    config: TrainConfig
    metrics: Metrics
    checkpoint: dict


def load_run(run_dir: str | Path) -> Run:
    """Read the config, metrics and checkpoint of a run directory.

    Raises:
        ReportError: the directory or one of its files is missing or unreadable.
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise ReportError(
            f"run directory {path} does not exist: pass the directory that pergrad train wrote (its --out)"
        )
    try:
        config = TrainConfig.load(path / "config.toml")
    except ConfigError as err:
        raise ReportError(f"{err}; rerun pergrad train to write it") from None
    metrics = load_metrics(path / "metrics.csv")
    try:
        checkpoint = load_checkpoint(path / "checkpoint.pt")
    except CheckpointError as err:
        raise ReportError(str(err)) from None
    if not isinstance(checkpoint.get("model"), dict) and not isinstance(checkpoint.get("sharded"), str):
        raise ReportError(f"{path / 'checkpoint.pt'} has no model weights; rerun pergrad train to write it")
    return Run(path, config, metrics, checkpoint)


def load_metrics(path: Path) -> Metrics:
    """Read ``metrics.csv``.

    Raises:
        ReportError: missing, unreadable, without the required columns or without rows.
    """
    if not path.is_file():
        raise ReportError(f"{path} is missing; rerun pergrad train (or --resume it) to write it")
    try:
        rows = read_metrics(path)
        with open(path, newline="") as f:
            header = f.readline().strip()
    except (OSError, UnicodeDecodeError, ValueError, TypeError) as err:
        reason = getattr(err, "strerror", None) or str(err)
        raise ReportError(
            f"{path} is not a metrics file that pergrad train wrote ({reason}); rerun pergrad train to rewrite it"
        ) from None
    names = tuple(header.split(","))
    missing = [c for c in Column.REQUIRED if c not in names]
    if missing:
        raise ReportError(
            f"{path} lacks the column(s) {', '.join(missing)}: it is not a metrics file that "
            "pergrad train wrote; rerun pergrad train to rewrite it"
        )
    if not rows:
        raise ReportError(f"{path} has no rows yet: train for at least log_every steps, then build the report")
    if any(row.get(Column.STEP) is None or not math.isfinite(row[Column.STEP]) for row in rows):
        raise ReportError(f"{path} has a row without a step; rerun pergrad train to rewrite it")
    return Metrics(rows, names)


def load_data_and_model(run: Run) -> tuple[Dataset, nn.Module]:
    """The run's dataset and its model at the checkpoint's weights (float32, eval mode).

    Raises:
        ReportError: the config's dataset or model cannot be rebuilt, or the checkpoint's
            weights do not fit the model.
    """
    try:
        dataset = load_dataset(run.config)
        model = build_model(run.config, dataset)
    except ConfigError as err:
        raise ReportError(f"{run.path / 'config.toml'}: {err}") from None
    try:
        if "sharded" in run.checkpoint:  # a --fsdp run: its shards, read whole in this one process
            from ..train.fsdp import load_whole_model  # torch.distributed.checkpoint only when needed

            load_whole_model(run.path / run.checkpoint["sharded"], model)
        else:
            model.load_state_dict(run.checkpoint["model"])
    except (RuntimeError, KeyError, TypeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ReportError(
            f"the weights in {run.path / 'checkpoint.pt'} do not fit the model that config.toml "
            f"describes ({first}); the two files come from different runs: rerun pergrad train"
        ) from None
    return dataset, model.eval()
