"""``pergrad train --tensorboard``: the event files, read back with TensorBoard's own reader, hold
the values of metrics.csv and a histogram of each row's per-example gradient norms."""

from __future__ import annotations

import math

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pergrad.cli.main import main
from pergrad.train.metrics import Column, read_metrics
from pergrad.train.tensorboard import HISTOGRAM


def _events(run_dir) -> EventAccumulator:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    return events


def test_event_files_hold_every_column_of_metrics_csv_and_the_norms(tmp_path):
    out = tmp_path / "run"
    code = main(["train", "--dataset", "linreg", "--model", "linear", "--epochs", "1", "--batch-size", "64",
                 "--log-every", "4", "--out", str(out), "--quiet", "--tensorboard"])  # fmt: skip
    assert code == 0
    rows = read_metrics(out / "metrics.csv")
    events = _events(out)
    scalars = set(events.Tags()["scalars"])
    columns = {c for row in rows for c, v in row.items() if v is not None and c != Column.STEP}
    assert columns <= scalars and Column.B_SIMPLE in columns and any(c.startswith(Column.SNR_PREFIX) for c in columns)
    for column in columns:
        logged = {e.step: e.value for e in events.Scalars(column)}
        for row in rows:
            if row.get(column) is not None and not math.isnan(row[column]):
                assert logged[row[Column.STEP]] == pytest.approx(row[column], rel=1e-6), (column, row[Column.STEP])
    histograms = {e.step: e.histogram_value for e in events.Histograms(HISTOGRAM)}
    assert sorted(histograms) == [r[Column.STEP] for r in rows]
    previous = 0
    for row in rows[:-1]:  # one norm per example of the row's steps (the epoch's last batch is smaller)
        h = histograms[row[Column.STEP]]
        assert h.num == row[Column.EXAMPLES] - previous
        assert h.max == pytest.approx(row[Column.NORM_MAX], rel=1e-12)
        previous = row[Column.EXAMPLES]
    assert 0 < histograms[rows[-1][Column.STEP]].num <= rows[-1][Column.EXAMPLES] - previous
