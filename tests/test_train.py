"""The trainer and `pergrad train`, end to end on tiny configurations."""

from __future__ import annotations

import math
import re

import pytest

from pergrad.cli.main import main
from pergrad.stats import NoiseScale, ParamSNR
from pergrad.train.checkpoint import load_checkpoint
from pergrad.train.config import ConfigError, TrainConfig
from pergrad.train.loop import train
from pergrad.train.metrics import read_metrics

TINY = dict(epochs=2, log_every=10, batch_size=32)


def test_run_directory_and_metrics(tmp_path):
    config = TrainConfig(out=str(tmp_path / "run"), **TINY)
    result = train(config, quiet=True)
    assert result.completed and result.step == 2 * 45
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert [r["step"] for r in rows] == [10, 20, 30, 40, 50, 60, 70, 80, 90]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert 0.5 < rows[-1]["val_accuracy"] <= 1.0
    assert rows[-1]["b_simple"] is not None and rows[-1]["b_simple"] > 0
    assert rows[-1]["b_simple_low"] <= rows[-1]["b_simple"] <= rows[-1]["b_simple_high"]
    assert any(k.startswith("snr/") for k in rows[-1])
    assert TrainConfig.load(tmp_path / "run" / "config.toml") == config
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 90


@pytest.mark.parametrize("stop_after", [37, 50])
def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path, stop_after):
    train(TrainConfig(out=str(tmp_path / "a"), **TINY), quiet=True)
    stopped = train(TrainConfig(out=str(tmp_path / "b"), **TINY), quiet=True, stop_after=stop_after)
    assert not stopped.completed
    resumed = train(TrainConfig.load(tmp_path / "b" / "config.toml").replace(out=str(tmp_path / "b")), resume=True, quiet=True)
    assert resumed.completed
    a, b = read_metrics(tmp_path / "a" / "metrics.csv"), read_metrics(tmp_path / "b" / "metrics.csv")
    assert len(a) == len(b)
    for row_a, row_b in zip(a, b):
        for key in ("step", "loss", "val_loss", "b_simple", "trace_sigma", "grad_cosine"):
            assert row_a[key] == row_b[key], (key, row_a["step"])


@pytest.mark.parametrize(
    "model, dataset",
    [("cnn", "digits"), ("transformer", "sequence"), ("linear", "linreg"), ("mlp", "sequence")],
)
def test_other_models_and_datasets_train(tmp_path, model, dataset):
    config = TrainConfig(model=model, dataset=dataset, epochs=1, log_every=20, out=str(tmp_path), lr=0.01)
    rows = train(config, quiet=True).rows
    assert rows and all(math.isfinite(r["loss"]) for r in rows)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dataset", "mnist"], "unknown dataset 'mnist'"),
        (["--model", "resnet"], "unknown model 'resnet'"),
        (["--lr", "-1"], "lr must be a positive"),
        (["--batch-size", "1"], "batch_size must be at least 2"),
        (["--model", "cnn", "--dataset", "linreg"], "does not fit"),
        (["--accumulate", "5"], "use a batch size divisible by 5"),
        (["--accumulate", "0"], "accumulate must be at least 1"),
        (["--nproc", "0"], "--nproc must be at least 1"),
        (["--noise-beta", "0"], "noise_beta must be in (0, 1]"),
        (["--noise-beta", "1.5"], "noise_beta must be in (0, 1]"),
        (["--noise-beta", "nan"], "noise_beta must be in (0, 1]"),
    ],
)
def test_bad_settings_give_one_line_errors(tmp_path, capsys, argv, message):
    code = main(["train", "--quiet", "--out", str(tmp_path / "run"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "metrics.csv").exists()


def test_unwritable_output_and_bad_checkpoints(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["train", "--quiet", "--out", str(blocker / "run")]) == 2
    assert "cannot write to output directory" in capsys.readouterr().err

    run = tmp_path / "run"
    train(TrainConfig(out=str(run), epochs=1, log_every=50), quiet=True, stop_after=3)
    (run / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert main(["train", "--quiet", "--resume", str(run)]) == 2
    assert "corrupt" in capsys.readouterr().err
    assert main(["train", "--quiet", "--resume", str(tmp_path / "nowhere")]) == 2
    assert "config file" in capsys.readouterr().err


def test_config_file_and_flags(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('dataset = "linreg"\nmodel = "linear"\nlr = 0.1\n')
    assert TrainConfig.load(path).lr == 0.1
    path.write_text("lr = 'fast'\n")
    with pytest.raises(ConfigError, match="lr"):
        TrainConfig.load(path)
    path.write_text("learning_rate = 0.1\n")
    with pytest.raises(ConfigError, match="unknown config keys"):
        TrainConfig.load(path)


@pytest.mark.parametrize("beta", [0.0, -0.5, 1.5, math.nan])
def test_one_beta_range_for_the_statistics_and_the_trainer(beta):
    """NoiseScale, ParamSNR and the trainer's config refuse the same β, with the same message."""
    message = re.escape("must be in (0, 1]")
    for make in (NoiseScale, ParamSNR):
        with pytest.raises(ValueError, match=message):
            make(beta)
    with pytest.raises(ConfigError, match="noise_beta " + message):
        TrainConfig(noise_beta=beta)


def test_beta_one_averages_all_batches_in_the_statistics_and_the_trainer():
    assert NoiseScale(1.0).beta == ParamSNR(1.0).beta == TrainConfig(noise_beta=1.0).noise_beta == 1.0


def test_measure_every_3_writes_the_expected_rows_and_the_report_states_it(tmp_path, capsys):
    """Steps 1, 4, 7, … (counted from 1) are measured; with a row per step, the others have the loss
    and empty statistics, and the smoothed noise scale is a NoiseScale of the measured steps alone."""
    import torch

    from pergrad.train import loop

    seen = []  # the merged StepResults the trainer's statistics were updated with
    original = loop._Statistics.update

    def spy(self, merged, weights=None):
        seen.append(merged)
        original(self, merged, weights)

    out = tmp_path / "run"
    loop._Statistics.update = spy
    try:
        code = main(["train", "--quiet", "--out", str(out), "--epochs", "1", "--batch-size", "64",
                     "--log-every", "1", "--measure-every", "3", "--noise-beta", "0.8"])  # fmt: skip
    finally:
        loop._Statistics.update = original
    assert code == 0
    rows = read_metrics(out / "metrics.csv")
    steps = [r["step"] for r in rows]
    assert steps == list(range(1, 24))  # 1437 training examples, batches of 64
    measured = [r["step"] for r in rows if r["b_simple"] is not None or r["trace_sigma"] is not None]
    assert measured == list(range(1, 24, 3)) and len(seen) == len(measured)
    for r in rows:
        assert r["loss"] is not None and math.isfinite(r["loss"])
        if r["step"] not in measured:
            assert r["norm_q50"] is None and r["grad_cosine"] is None and r["snr/0.weight"] is None
    noise = NoiseScale(beta=0.8)
    for step, merged in zip(measured, seen):
        noise.update_estimate(merged.estimate(), merged.names)
        row = rows[step - 1]
        assert row["trace_sigma"] == pytest.approx(float(noise.trace_sigma), rel=1e-12)
        assert row["grad_sq_norm"] == pytest.approx(float(noise.grad_sq_norm), rel=1e-12)
    assert TrainConfig.load(out / "config.toml").measure_every == 3
    html = (out / "report.html").read_text()
    assert "measure_every = 3: steps 1, 4, 7" in html and "β = 0.8 per measured step" in html
    assert torch.load(out / "checkpoint.pt", weights_only=False)["window"]["measured"] == 0  # saved after the last row


def test_resume_with_measure_every_gives_the_same_rows(tmp_path):
    config = dict(TINY, measure_every=4, log_every=3, epochs=1)
    train(TrainConfig(out=str(tmp_path / "a"), **config), quiet=True)
    train(TrainConfig(out=str(tmp_path / "b"), **config), quiet=True, stop_after=10)
    train(TrainConfig.load(tmp_path / "b" / "config.toml").replace(out=str(tmp_path / "b")), resume=True, quiet=True)
    a, b = read_metrics(tmp_path / "a" / "metrics.csv"), read_metrics(tmp_path / "b" / "metrics.csv")
    assert a == b
    assert any(r["b_simple"] is None for r in a) and any(r["b_simple"] is not None for r in a)


def test_measure_every_must_be_a_whole_number_of_at_least_one(tmp_path, capsys):
    assert main(["train", "--quiet", "--out", str(tmp_path / "run"), "--measure-every", "0"]) == 2
    assert "measure_every must be a whole number >= 1" in capsys.readouterr().err
