"""``pergrad cbs``: the branched search, the closed-form ground truth, an interrupted sweep that
resumes without redoing finished jobs, the result file and report section, one-line errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pergrad.cli.main import main
from pergrad.train import cbs
from pergrad.train.checkpoint import load_checkpoint
from pergrad.train.config import TrainConfig
from pergrad.train.data import LINREG_NOISE, linreg_problem
from pergrad.train.ground_truth import linreg_noise_scales

# the smallest measurement: synthetic linear regression, one epoch, the quick plan on one process
TINY = ["--dataset", "linreg", "--model", "linear", "--lr", "0.05", "--epochs", "1", "--quick", "--jobs", "1"]


@pytest.mark.parametrize(
    "losses, expected",
    [
        ([1.0, 1.02, 1.05, 1.3, 2.0], (4.0, True)),  # threshold at the third branch
        ([1.0, 1.3, 1.02, 1.01, 1.0], (1.0, True)),  # a lucky branch beyond a failure does not count
        ([1.0, 0.9, 1.08, 1.09, 1.1], (16.0, False)),  # all within 10 %: only a lower bound
        ([1.0, 1.05, math.nan, 1.0, 1.0], (2.0, True)),  # a diverged branch fails
    ],
)
def test_branch_search_finds_the_threshold_of_a_loss_table(losses, expected):
    assert cbs.branch_critical_batch([1, 2, 4, 8, 16], losses, tolerance=0.1) == expected


def test_branch_tolerance_moves_the_threshold():
    losses = [1.0, 1.04, 1.08, 1.16, 1.32]
    assert [cbs.branch_critical_batch([1, 2, 4, 8, 16], losses, t)[0] for t in (0.0, 0.05, 0.1, 0.2, 0.5)] == [1, 2, 4, 8, 16]


@pytest.mark.parametrize("at_optimum", [False, True])
def test_linreg_noise_scales_match_a_monte_carlo_of_per_example_gradients(at_optimum):
    """tr Σ, |G|², tr(HΣ), GᵀHG from 400k explicit per-example gradients e·(x, 1) in float64."""
    config = TrainConfig(dataset="linreg", model="linear", seed=3)
    h, w_star = (t.double() for t in linreg_problem(torch.Generator().manual_seed(3)))
    gen = torch.Generator().manual_seed(11)
    r = torch.zeros(h.shape[0], dtype=torch.float64)
    r[0], r[-1] = 0.3, 1.0  # off in the steepest and the flattest direction: B_noise ≠ B_simple
    w = w_star + (0.0 if at_optimum else 1.0) * r
    b = torch.tensor(0.0 if at_optimum else 0.1, dtype=torch.float64)
    n = 400_000
    x = torch.randn(n, h.shape[0], generator=gen, dtype=torch.float64) * h.sqrt()
    y = x @ w_star + LINREG_NOISE * torch.randn(n, generator=gen, dtype=torch.float64)
    z = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1)  # (n, d + 1)
    grads = ((x @ w + b - y)[:, None]) * z  # (n, d + 1) per-example gradients of ½(f − y)²
    g = grads.mean(0)
    centered = grads - g
    hess = torch.cat([h, torch.ones(1, dtype=torch.float64)])  # the Hessian's diagonal (E zzᵀ is diagonal)
    trace_sigma = centered.square().sum() / (n - 1)
    trace_h_sigma = (hess * centered.square()).sum() / (n - 1)
    b_noise, b_simple = linreg_noise_scales(config, w, b)
    if at_optimum:  # G = 0: both are unbounded
        assert b_noise == math.inf and b_simple == math.inf
        return
    assert b_simple == pytest.approx(float(trace_sigma / g.square().sum()), rel=0.02)
    assert b_noise == pytest.approx(float(trace_h_sigma / (hess * g.square()).sum()), rel=0.02)
    assert abs(b_noise / b_simple - 1) > 0.2  # the two differ here, so the test tells them apart


def test_an_interrupted_cbs_resumes_without_redoing_finished_jobs(tmp_path, monkeypatch, capsys):
    out = tmp_path / "cbs"
    real = cbs.run_job
    first, second = [], []

    def interrupted(job):
        if len(first) == 3:
            raise KeyboardInterrupt
        first.append(job["name"])
        return real(job)

    monkeypatch.setattr(cbs, "run_job", interrupted)
    assert main(["cbs", *TINY, "--out", str(out)]) == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    assert sorted(p.stem for p in (out / "cbs" / "jobs").glob("*.json")) == sorted(first)
    reference_mtime = (out / "metrics.csv").stat().st_mtime_ns

    monkeypatch.setattr(cbs, "run_job", lambda job: second.append(job["name"]) or real(job))
    assert main(["cbs", *TINY, "--out", str(out)]) == 0
    stdout, err = capsys.readouterr()
    assert not set(first) & set(second)  # nothing done twice
    plan_config = TrainConfig(dataset="linreg", model="linear", lr=0.05, epochs=1)
    plan = cbs.make_plan(plan_config, quick=True)
    assert len(first) + len(second) == plan.n_jobs and f"[{plan.n_jobs}/{plan.n_jobs}]" in err
    assert (out / "metrics.csv").stat().st_mtime_ns == reference_mtime  # the reference run was not redone

    result = json.loads((out / "cbs.json").read_text())
    low, high = result["b_crit_interval"]
    assert isinstance(result["b_crit"], float) and low <= result["b_crit"] <= high
    assert len(result["b_simple_interval"]) == 2 and result["b_simple"] > 0
    assert result["ratio"] == pytest.approx(result["b_simple"] / result["b_crit"])
    assert len(result["points"]) >= 4 and len(result["sweep"]) == len(plan.batch_sizes) * 3 * 2  # 3 lrs, 2 seeds
    assert [b["step"] for b in result["branches"]] == sorted({b["step"] for b in result["branches"]})
    truth = result["ground_truth"]
    steps = [r["step"] for r in truth["along_run"]]
    assert steps == sorted(steps) and truth["steps_to_target"] in steps and len(steps) >= plan.truth_points
    at_target = truth["along_run"][steps.index(truth["steps_to_target"])]
    assert truth["b_noise_at_target"] == at_target["b_noise"] > 0 and truth["b_noise_median_to_target"] > 0
    final = load_checkpoint(out / "checkpoint.pt")["model"]  # the replay ends where the reference run ended
    b_noise_end, _ = linreg_noise_scales(plan_config, final["weight"].reshape(-1), final["bias"].reshape(()))
    assert truth["along_run"][-1]["b_noise"] == pytest.approx(b_noise_end, rel=1e-12)
    assert "B_crit = " in stdout

    html = (out / "report.html").read_text()
    section = html[html.index('<section id="cbs">') : html.index("</section>", html.index('<section id="cbs">'))]
    assert "Critical batch size" in section and "B_noise" in section and "McCandlish" in section
    data = json.loads((out / "report_data.json").read_text())
    assert data["cbs"]["b_crit"] == pytest.approx(result["b_crit"])
    assert "measured critical batch size" in data["noise-scale"]["message"]  # the advice used B_crit


def test_a_report_without_a_measurement_says_how_to_get_one():
    from pergrad.report.cbs import cbs_section

    body, data = cbs_section("cbs", "Critical batch size", None, metrics=None)
    assert data == {"measured": False} and "pergrad cbs" in body.markup


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--jobs", "0"], "--jobs must be at least 1"),
        (["--seeds", "1"], "--seeds must be at least 2"),
        (["--target-loss", "-1"], "--target-loss must be a positive number"),
        (["--tolerance", "-0.5"], "--tolerance must be a number >= 0"),
        (["--lr", "-1"], "lr must be a positive"),
        (["--batch-size", "6", "--accumulate", "3"], "does not split"),
        (["--target-loss", "1e-9"], "never reached the target validation loss"),
    ],
)
def test_bad_settings_give_one_line_errors(tmp_path, capsys, argv, message):
    """Settings are checked before anything runs (one line on stderr); a target the reference
    run never reaches is found after it (its progress line, then the one-line error)."""
    code = main(["cbs", *TINY, "--out", str(tmp_path / "cbs"), *argv])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and lines[-1].startswith("pergrad cbs: error: ") and message in lines[-1]
    assert len(lines) == (2 if "never reached" in message else 1) and "Traceback" not in "".join(lines)


def test_other_settings_in_the_same_directory_are_refused(tmp_path, capsys):
    out = tmp_path / "cbs"
    config = TrainConfig(dataset="linreg", model="linear", epochs=1, out=str(out))
    (out / "cbs").mkdir(parents=True)
    (out / "cbs" / "plan.json").write_text(json.dumps(cbs._plan_record(config.replace(lr=0.5), cbs.make_plan(config, quick=True))))
    assert main(["cbs", *TINY, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "holds a cbs run with other settings" in err and len(err.strip().splitlines()) == 1


def test_data_seed_keeps_the_data_while_seed_changes_the_run():
    from pergrad.train.data import load_dataset

    base = TrainConfig(dataset="linreg", model="linear")
    same = [load_dataset(base.replace(seed=s, data_seed=0)) for s in (0, 5)]
    assert torch.equal(same[0].train_x, same[1].train_x) and torch.equal(same[0].val_y, same[1].val_y)
    assert not torch.equal(load_dataset(base.replace(seed=5)).train_x, same[0].train_x)  # -1: data from seed
    with pytest.raises(ValueError, match="data_seed must be -1"):
        base.replace(data_seed=-2)
