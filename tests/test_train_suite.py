"""`pergrad check`, the trainer's sampling warning, and the report's assumptions section."""

from __future__ import annotations

import io
import json
import re

import pytest
import torch
from torch import nn

from pergrad.train import suite
from pergrad.train.suite import run_checks, sampling_warning
from pergrad.cli.main import main
from pergrad.report import build_report
from pergrad.train.config import TrainConfig
from pergrad.train.data import load_dataset
from pergrad.train.loop import train
from pergrad.train.metrics import read_metrics


def test_check_table_passes_on_the_default_setup(capsys):
    assert main(["check"]) == 0
    out = capsys.readouterr().out
    header, rule, *rows = out.splitlines()
    assert header.split()[:2] == ["check", "result"] and "what it means" in header
    for name in ("averaging identity", "additivity (no coupling)", "random sampling (shuffled)"):
        assert any(line.startswith(name) and "pass:" in line for line in rows), name
    assert "FAIL" not in out


def test_check_fails_sorted_batches_with_exit_code_1(capsys):
    assert main(["check", "--order", "sorted"]) == 1
    out = capsys.readouterr().out
    (line,) = [line for line in out.splitlines() if line.startswith("random sampling (sorted)")]
    assert "FAIL: p = 0" in line
    assert "shuffle=True" in out  # the fix is named


def test_check_rows_for_the_transformer_setup():
    rows = run_checks(TrainConfig(model="transformer", dataset="sequence"))
    assert [row.passed for row in rows] == [True, True, True]
    batch, pergrad = re.fullmatch(r"max rel\. diff (\S+), pergrad (\S+)", rows[0].result).groups()
    assert float(batch) <= 1e-10 and float(pergrad) <= 1e-10


def test_check_fails_the_identity_of_a_model_with_batchnorm_in_training_mode(capsys, monkeypatch):
    """`pergrad check` shows the identity against independent gradients: BatchNorm couples examples."""

    def with_batchnorm(config, dataset):
        torch.manual_seed(config.seed)
        return nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 10))

    monkeypatch.setattr(suite, "build_model", with_batchnorm)
    assert main(["check"]) == 1
    out = capsys.readouterr().out
    identity_row = " ".join(out[out.index("averaging identity") : out.index("additivity (no coupling)")].split())
    assert identity_row.startswith("averaging identity FAIL: max rel. diff inf The averaging identity does NOT hold")
    assert "one example alone fails" in identity_row
    assert "Examples are coupled by '1' (BatchNorm1d in training mode)" in identity_row


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--order", "sorted", "--dataset", "linreg", "--model", "linear"], "has none: use it with --dataset digits"),
        (["--batch-size", "1"], "batch_size must be at least 2"),
        (["--model", "resnet"], "unknown model 'resnet'"),
    ],
)
def test_check_bad_settings_exit_2_with_one_line(capsys, argv, message):
    assert main(["check", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_trainer_warns_before_training_on_a_sorted_order_only(tmp_path):
    for order, warned in (("sorted", True), ("shuffled", False)):
        config = TrainConfig(order=order, epochs=1, log_every=10, out=str(tmp_path / order))
        assert (sampling_warning(config, load_dataset(config)) is not None) == warned
        stream = io.StringIO()
        train(config, quiet=True, stop_after=1, stream=stream)
        text = stream.getvalue()
        assert text.startswith("warning: batch order 'sorted' fails the sampling check") == warned
        assert ("warning" in text) == warned


@pytest.mark.slow
def test_sorted_run_report_shows_the_failed_check_and_aligned_gradients(tmp_path):
    runs = {}
    for order in ("sorted", "shuffled"):
        config = TrainConfig(order=order, epochs=2, log_every=5, out=str(tmp_path / order))
        train(config, quiet=True, stream=io.StringIO())
        build_report(tmp_path / order)
        html = (tmp_path / order / "report.html").read_text()
        assert 'id="assumptions"' in html
        runs[order] = json.loads((tmp_path / order / "report_data.json").read_text())["assumptions"]
        rows = read_metrics(tmp_path / order / "metrics.csv")
        runs[order]["val_accuracy"] = rows[-1]["val_accuracy"]
        runs[order]["grad_cosine"] = sum(r["grad_cosine"] for r in rows[1:]) / (len(rows) - 1)
    sorted_run, shuffled = runs["sorted"], runs["shuffled"]
    assert not sorted_run["passed"] and sorted_run["p_value"] < 1e-3
    assert shuffled["passed"] and shuffled["p_value"] >= 1e-3
    # the consequence: consecutive gradients point the same (class-specific) way, and training fails
    assert sorted_run["grad_cosine"] > 0.6 > shuffled["grad_cosine"]
    assert sorted_run["val_accuracy"] < 0.3 < 0.8 < shuffled["val_accuracy"]
