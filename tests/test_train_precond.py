"""B_P in the applications: the trainer's ``b_precond`` columns, ``--batch-size auto`` under Adam,
the Lightning callback's ``pergrad/b_precond``, the report's advice, and ``pergrad cbs``'s B_crit
interval over the learning-rate grid and at two targets."""

from __future__ import annotations

import io
import json
import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.warnings import PossibleUserWarning
from torch import nn
from torch.utils.data import DataLoader

import pergrad
from pergrad.integrations.lightning import PergradCallback
from pergrad.report import build_report
from pergrad.stats import BatchEstimate, NoiseScale
from pergrad.train import cbs, loop
from pergrad.train.config import TrainConfig
from pergrad.train.metrics import Column, read_metrics

from lightning_worker import C, D, data

SHORT = dict(epochs=1, log_every=5, batch_size=64)


@pytest.fixture(scope="module")
def adam_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("adam") / "run"
    loop.train(TrainConfig(optimizer="adam", lr=0.003, out=str(out), **SHORT), quiet=True, stream=io.StringIO())
    return out


def test_adam_runs_log_b_precond_and_sgd_runs_do_not(adam_run, tmp_path):
    rows = read_metrics(adam_run / "metrics.csv")
    later = rows[1:]
    assert all(math.isfinite(r[Column.B_PRECOND]) and r[Column.B_PRECOND_LOW] <= r[Column.B_PRECOND] <= r[Column.B_PRECOND_HIGH]
               for r in later)  # fmt: skip
    assert any(r[Column.B_PRECOND] != pytest.approx(r[Column.B_SIMPLE], rel=1e-3) for r in later)
    loop.train(TrainConfig(out=str(tmp_path / "sgd"), **SHORT), quiet=True, stream=io.StringIO())
    assert Column.B_PRECOND not in read_metrics(tmp_path / "sgd" / "metrics.csv")[0]


def test_the_report_of_an_adam_run_draws_both_and_advises_from_b_p(adam_run):
    build_report(adam_run)
    numbers = json.loads((adam_run / "report_data.json").read_text())["noise-scale"]
    assert numbers["predictor"] == "B_P"
    assert numbers["message"].startswith("The advice reads B_P")
    assert "Adam steps along" in numbers["message"]
    last = read_metrics(adam_run / "metrics.csv")[-1]
    assert numbers["b_simple_median"] == pytest.approx(last[Column.B_PRECOND], rel=0.5)
    assert numbers["b_simple_same_steps_median"] == pytest.approx(last[Column.B_SIMPLE], rel=0.5)
    html = (adam_run / "report.html").read_text()
    assert "Violet: B_P" in html


@pytest.mark.parametrize("optimizer, expected", [("adam", 64), ("sgd", 16)])
def test_auto_batch_size_follows_b_p_under_adam_and_b_simple_under_sgd(tmp_path, optimizer, expected):
    config = TrainConfig(optimizer=optimizer, batch_size="auto", min_batch_size=16, max_batch_size=128,
                         out=str(tmp_path / "run"), epochs=1)  # fmt: skip
    run, _ = loop._setup(config, resume=False)
    names = tuple(n for n, _ in run.model.named_parameters())

    def steady(b: float) -> NoiseScale:  # a noise scale that has said b for 30 batches
        noise = NoiseScale(0.95)
        for _ in range(30):
            noise.update_estimate(BatchEstimate(torch.full((1 + len(names),), b, dtype=torch.float64),
                                                torch.ones(1 + len(names), dtype=torch.float64)), names)  # fmt: skip
        return noise

    run.stats.noise = steady(16.0)
    if run.stats.precond is not None:
        run.stats.precond.state, run.stats.precond.names = steady(64.0).state, names
    assert loop._next_batch(run).numel() == expected


class _AdamClassifier(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, C)).double()
        self.steps: list[tuple] = []  # (batch, weights, Adam's exp_avg_sq and step) before each step

    def on_train_batch_start(self, batch, batch_idx):  # (training_step also reruns on single examples: the check)
        x, y = batch
        self._batch = (x.double(), y)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x.double()), y)

    def on_before_optimizer_step(self, optimizer):
        state = [optimizer.state.get(p, {}) for p in self.parameters()]
        v = [s["exp_avg_sq"].clone() if "exp_avg_sq" in s else None for s in state]
        t = float(state[0]["step"]) if state[0] else 0.0
        weights = {k: q.detach().clone() for k, q in self.named_parameters()}
        self.steps.append((self._batch, weights, v, t))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05, betas=(0.9, 0.99), eps=1e-4)


def test_lightning_callback_logs_b_precond_equal_to_a_hand_computation(tmp_path):
    module = _AdamClassifier()
    callback = PergradCallback(beta=0.9)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, callbacks=[callback], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(tmp_path))  # fmt: skip
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=PossibleUserWarning)
        trainer.fit(module, DataLoader(data(), batch_size=8, shuffle=False))
    model = nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, C)).double()
    names = [k for k, _ in model.named_parameters()]
    current = {}
    by_hand = NoiseScale(0.9, preconditioner=lambda: current or None)
    for (x, y), weights, v, t in module.steps:
        model.load_state_dict({k.removeprefix("net."): w for k, w in weights.items()})
        current.clear()
        if t > 0:
            current.update({n: 1.0 / ((vv / (1 - 0.99**t)).sqrt() + 1e-4) for n, vv in zip(names, v)})
        with pergrad.PerExample(model, second_moment=True) as pe:
            by_hand.update(pe.backward(F.cross_entropy(model(x), y, reduction="none")))
    assert by_hand.effective_batches > 2  # the first step (no Adam state) was skipped, the others counted
    assert float(trainer.callback_metrics["pergrad/b_precond"]) == pytest.approx(by_hand.b_simple, rel=1e-6)
    assert float(trainer.callback_metrics["pergrad/b_precond_high"]) == pytest.approx(by_hand.interval()[1], rel=1e-6)


def _sweep(steps_by_lr: dict[float, dict[int, float]], seeds=(0, 1), jitter=0.02) -> list[dict]:
    """Sweep job results: {lr: {B: mean steps}} at one target, two seeds either side of the mean."""
    out = []
    for lr, by_b in steps_by_lr.items():
        for b, s in by_b.items():
            for k, seed in enumerate(seeds):
                steps = s * (1 + (jitter if k else -jitter))
                at = {"target": 0.2, "reached": True, "steps": steps, "examples": steps * b}
                out.append({"kind": "sweep", "batch_size": b, "lr": lr, "seed": seed, **at, "at_targets": [at]})
    return out


def _hyperbola(s_min: float, b_crit: float, sizes) -> dict[int, float]:
    return {b: s_min * (1 + b_crit / b) for b in sizes}


def test_b_crit_interval_widens_with_the_learning_rate_grid():
    """Best lr: B_crit = 50; the second-best lr is under-tuned at large B only (B_crit 25 if read
    from it). The seed interval stays near 50; the reported interval reaches down towards 25."""
    sizes = (8, 32, 128, 512)
    best = _hyperbola(20, 50, sizes)
    second = {b: s * (1.0 if b < 100 else 1.6) for b, s in best.items()}
    third = {b: s * 3 for b, s in best.items()}
    measured = cbs._measure(_sweep({0.1: best, 0.2: second, 0.05: third}), seeds=2, i=0)
    assert measured["b_crit"] == pytest.approx(50, rel=0.05)
    seed_low, seed_high = measured["b_crit_seed_interval"]
    low, high = measured["b_crit_interval"]
    assert 40 < seed_low <= 50 <= seed_high < 60
    assert low < 0.75 * seed_low and high >= seed_high
    assert measured["lr_at_edge"] == []  # 0.1 sits between 0.05 and 0.2 at every B
    grid_same = cbs._measure(_sweep({0.1: best, 0.2: best, 0.05: third}), seeds=2, i=0)
    assert grid_same["b_crit_interval"] == pytest.approx(grid_same["b_crit_seed_interval"], rel=0.05)


def test_sweep_jobs_cross_two_targets_and_cbs_measures_b_crit_at_both(tmp_path, capsys):
    from pergrad.cli.main import main

    out = tmp_path / "cbs"
    argv = ["cbs", "--dataset", "linreg", "--model", "linear", "--lr", "0.05", "--epochs", "1", "--quick",
            "--jobs", "1", "--optimizer", "adam", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((out / "cbs.json").read_text(), parse_constant=float)
    first, second = summary["at_targets"]
    assert second["target_loss"] > first["target_loss"]
    assert summary["b_precond"] is not None and summary["b_precond"] == first["b_precond"]
    for job in summary["sweep"]:
        hard, easy = job["at_targets"]  # the first target is the harder one
        if hard["reached"]:
            assert easy["reached"] and easy["steps"] <= hard["steps"]
    assert "B_P" in capsys.readouterr().out
    assert summary["quick_check"] == cbs.QUICK_CHECK  # a quick run says how far quick was from the full sweep
    assert "This is a --quick measurement" in (out / "report.html").read_text()
    data = json.loads((out / "report_data.json").read_text())["cbs"]
    assert len(data["at_targets"]) == 2 and data["b_precond"] == summary["b_precond"]
