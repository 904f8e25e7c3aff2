"""`pergrad train --batch-size auto`: the batches, exact resume across a change of B, the
learning rate, the config and the report."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
import torch

from pergrad.checks import check_sampling
from pergrad.train.suite import first_epoch
from pergrad.cli.main import main
from pergrad.report import build_report
from pergrad.train.checkpoint import load_checkpoint, save_checkpoint
from pergrad.train.config import TrainConfig
from pergrad.train.data import load_dataset
from pergrad.train.loop import train
from pergrad.train.metrics import read_metrics
from pergrad.train.sampler import BatchOrder, sizes_by_step

# one epoch of digits (1437 training examples); B jumps from 16 to 64 at step 11, then drops
AUTO = dict(batch_size="auto", min_batch_size=16, max_batch_size=64, epochs=1, log_every=5)


def _spy_batches(monkeypatch) -> list[torch.Tensor]:
    """Record the examples of every step as the trainer indexes them: the concatenation of the
    micro-batches it asks the batch order for (one process)."""
    steps = []
    original = BatchOrder.micro_batches

    def spy(batch, rank, world, accumulate):
        parts = original(batch, rank, world, accumulate)
        steps.append(torch.cat(parts))
        return parts

    monkeypatch.setattr(BatchOrder, "micro_batches", staticmethod(spy))
    return steps


@pytest.fixture(scope="module")
def auto_run(tmp_path_factory) -> tuple[Path, list[torch.Tensor]]:
    """One uninterrupted auto run and the batches it actually used."""
    out = tmp_path_factory.mktemp("auto") / "run"
    with pytest.MonkeyPatch.context() as monkeypatch:
        batches = _spy_batches(monkeypatch)
        train(TrainConfig(out=str(out), **AUTO), quiet=True, stream=io.StringIO())
    return out, batches


def test_batches_stay_random_without_replacement_across_changes_of_b(auto_run):
    run, batches = auto_run
    config = TrainConfig.load(run / "config.toml")
    dataset = load_dataset(config)
    n = dataset.train_x.shape[0]
    changes = load_checkpoint(run / "checkpoint.pt")["batch_sizes"]
    assert len(changes) >= 3 and changes[0] == (0, 16)  # B changed, within the epoch
    sizes = [b.numel() for b in batches]
    assert len(set(sizes)) >= 3 and sum(sizes) == n
    assert torch.equal(torch.cat(batches).sort().values, torch.arange(n))  # each example once
    report = check_sampling(batches, dataset.labels)
    assert report.passed and report.repeated == 0 and report.missing == 0, report.explanation
    # the report checks these same batches, rebuilt from the checkpoint
    rebuilt = first_epoch(config, dataset, changes)
    assert len(rebuilt) == len(batches) and all(torch.equal(a, b) for a, b in zip(rebuilt, batches))


def test_metrics_give_the_batch_size_in_force_the_examples_and_the_scaled_learning_rate(auto_run):
    run, batches = auto_run
    rows = read_metrics(run / "metrics.csv")
    sizes = [b.numel() for b in batches]
    in_force = [b for _, b in zip(batches, sizes_by_step(load_checkpoint(run / "checkpoint.pt")["batch_sizes"]))]
    assert sizes[:-1] == in_force[:-1] and sizes[-1] <= in_force[-1]  # the epoch's last batch: what remains
    for row in rows:
        step = row["step"]
        assert row["batch_size"] == in_force[step - 1]  # the B of the row's last step
        assert row["examples"] == sum(sizes[:step])
        assert row["lr"] == pytest.approx(0.05 * row["batch_size"] / 16, rel=1e-12)  # SGD: linear
    assert {16, 64} <= {row["batch_size"] for row in rows}


@pytest.mark.parametrize("stop_after", [12, 30])
def test_resume_is_bit_exact_across_a_change_of_batch_size(auto_run, tmp_path, stop_after):
    run, _ = auto_run
    out = tmp_path / "stopped"
    train(TrainConfig(out=str(out), **AUTO), quiet=True, stream=io.StringIO(), stop_after=stop_after)
    stopped = load_checkpoint(out / "checkpoint.pt")
    assert stopped["step"] == stop_after and "batch_size_rule" in stopped
    resumed = train(TrainConfig.load(out / "config.toml").replace(out=str(out)), resume=True, quiet=True, stream=io.StringIO())
    assert resumed.completed
    assert read_metrics(out / "metrics.csv") == read_metrics(run / "metrics.csv")
    a, b = load_checkpoint(out / "checkpoint.pt"), load_checkpoint(run / "checkpoint.pt")
    assert a["batch_sizes"] == b["batch_sizes"] and a["batch_size_rule"] == b["batch_size_rule"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])


def test_adam_scales_the_learning_rate_with_the_square_root(tmp_path):
    # under Adam B follows B_P, whose interval at B = 16 stays unbounded for the first epoch: start at 32
    config = TrainConfig(out=str(tmp_path), optimizer="adam", lr=0.002,
                         **{**AUTO, "epochs": 1, "min_batch_size": 32, "max_batch_size": 128})  # fmt: skip
    rows = train(config, quiet=True, stream=io.StringIO(), stop_after=30).rows
    assert any(row["batch_size"] > 32 for row in rows)
    for row in rows:
        assert row["lr"] == pytest.approx(0.002 * (row["batch_size"] / 32) ** 0.5, rel=1e-12)


def test_the_report_draws_b_over_training_and_lists_each_change(auto_run, tmp_path):
    run, _ = auto_run
    build_report(run)
    data = json.loads((run / "report_data.json").read_text())
    adaptive = data["noise-scale"]["adaptive"]
    changes = load_checkpoint(run / "checkpoint.pt")["batch_sizes"]
    assert adaptive["lr_scaling"] == "linear"
    assert [(c["step"], c["batch_size"]) for c in adaptive["changes"]] == changes
    assert data["assumptions"]["passed"]
    page = (run / "report.html").read_text()
    section = re.search(r'<section id="noise-scale">(.*?)</section>', page, re.S).group(1)
    assert f"It changed {len(changes) - 1} time(s)" in section and "linear for SGD" in section
    table = re.search(r'<table id="batch-size-changes">(.*?)</table>', section, re.S).group(1)
    assert table.count("<tr>") == 1 + len(changes)


def test_batch_order_takes_any_size_and_never_leaves_one_example_alone():
    order = BatchOrder(9, 4, seed=0)
    perm = order.permutation(0)
    assert torch.equal(order.take(0, 0, 3), perm[:3])
    assert torch.equal(order.take(0, 3, 5), perm[3:])  # 1 would be left over: it joins the batch
    assert [b.numel() for b in order.batches(0)] == [4, 5]
    assert [b.numel() for b in order.batches(0, [2, 5, 8])] == [2, 5, 2]
    with pytest.raises(ValueError, match="ran out"):
        order.batches(0, [2, 2])
    assert list(zip(range(7), sizes_by_step([(0, 16), (2, 32), (5, 8)]))) == list(
        enumerate([16, 16, 32, 32, 32, 8, 8])
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batch-size", "auto", "--min-batch-size", "1"], "min_batch_size must be at least 2"),
        (["--batch-size", "auto", "--min-batch-size", "64", "--max-batch-size", "32"], "below min_batch_size 64"),
        (["--max-batch-size", "64"], "--max-batch-size only bound --batch-size auto"),
        (["--batch-size", "auto", "--accumulate", "3"], "max batch size divisible by 3"),
        (["--batch-size", "big"], "expected a whole number or 'auto'"),
    ],
)
def test_bad_bounds_give_one_line_errors(tmp_path, capsys, argv, message):
    code = main(["train", "--quiet", "--out", str(tmp_path / "run"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_without_a_position_in_examples_is_refused_with_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    train(TrainConfig(out=str(run), **AUTO), quiet=True, stream=io.StringIO(), stop_after=2)
    state = load_checkpoint(run / "checkpoint.pt")
    del state["offset"], state["format"]
    save_checkpoint(run / "checkpoint.pt", state)
    assert main(["train", "--quiet", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "written by an older pergrad" in err and len(err.strip().splitlines()) == 1


def test_cbs_refuses_auto_with_one_line(tmp_path, capsys):
    assert main(["cbs", "--batch-size", "auto", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "sweeps fixed batch sizes" in err and len(err.strip().splitlines()) == 1


def test_auto_in_a_config_file(tmp_path):
    path = tmp_path / "c.toml"
    TrainConfig(**AUTO).save(path)
    assert 'batch_size = "auto"' in path.read_text()
    loaded = TrainConfig.load(path)
    assert loaded.auto and loaded.first_batch_size == 16 and loaded == TrainConfig(**AUTO)
    path.write_text('batch_size = "large"\n')
    with pytest.raises(ValueError, match="must be int or 'auto'"):
        TrainConfig.load(path)


def test_auto_with_measure_every_moves_b_only_after_measured_steps_and_resumes_exactly(tmp_path):
    """measure_every=2: B changes only at a step that follows a measured one (steps 0, 2, 4, …), the
    batches still cover the epoch without replacement, and a stop and resume is bit-exact."""
    config = dict(AUTO, measure_every=2, min_batch_size=8)
    straight = tmp_path / "straight"
    with pytest.MonkeyPatch.context() as monkeypatch:
        batches = _spy_batches(monkeypatch)
        train(TrainConfig(out=str(straight), **config), quiet=True, stream=io.StringIO())
    changes = load_checkpoint(straight / "checkpoint.pt")["batch_sizes"]
    assert len(changes) >= 2  # B did follow the measurements
    assert all((step - 1) % 2 == 0 for step, _ in changes[1:])
    seen = torch.cat(batches)
    assert seen.numel() == len(set(seen.tolist())) == load_dataset(TrainConfig(**config)).train_x.shape[0]
    stopped = tmp_path / "stopped"
    train(TrainConfig(out=str(stopped), **config), quiet=True, stream=io.StringIO(), stop_after=changes[1][0] + 1)
    train(TrainConfig.load(stopped / "config.toml").replace(out=str(stopped)), resume=True, quiet=True, stream=io.StringIO())
    assert read_metrics(stopped / "metrics.csv") == read_metrics(straight / "metrics.csv")
    assert load_checkpoint(stopped / "checkpoint.pt")["batch_sizes"] == changes
