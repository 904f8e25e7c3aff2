"""pergrad.integrations.lightning: a real lightning.Trainer (CPU) with PergradCallback, its logged
statistics against pergrad run by hand on the same batches and weights.

The by-hand reference runs one ``PerExample.backward`` on each step's whole batch (all its
micro-batches, of all workers) at the weights that step started from, and feeds
``NoiseScale.update`` / ``ParamSNR.update``: not the callback's path (gathered external backward
passes, merged sums), so a wrong gathering, scaling or merge shows.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pergrad
from pergrad.cli.main import main
from pergrad.stats import NoiseScale, ParamSNR, norm_quantiles
from pergrad.train.metrics import Column, read_metrics

from lightning_worker import C, D, fit
from workers import run_two_workers

BETA = 0.9


def by_hand(weights: list[dict], steps: list[list[tuple]], dtype=torch.float64) -> list[dict]:
    """{Column: value} after each step, from one backward of each step's whole batch."""
    model = nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, C)).to(dtype)
    noise, snr = NoiseScale(beta=BETA), ParamSNR(beta=BETA)
    rows = []
    for w, batches in zip(weights, steps):
        model.load_state_dict({k.removeprefix("net."): v.to(dtype) for k, v in w.items()})
        x = torch.cat([b[0] for b in batches]).to(dtype)
        y = torch.cat([b[1] for b in batches])
        model.zero_grad(set_to_none=True)
        with pergrad.PerExample(model, second_moment=True) as pe:
            result = pe.backward(F.cross_entropy(model(x), y, reduction="none"))
        noise.update(result)
        snr.update(result)
        e = noise.estimate(0.95)
        q = norm_quantiles(result.norms, [0.1, 0.5, 0.9])
        row = {Column.B_SIMPLE: e.b_simple, Column.B_SIMPLE_LOW: e.lower, Column.B_SIMPLE_HIGH: e.upper,
               Column.TRACE_SIGMA: e.trace_sigma, Column.GRAD_SQ_NORM: e.grad_sq_norm,
               "norm_q10": float(q[0]), "norm_q50": float(q[1]), "norm_q90": float(q[2]),
               Column.NORM_MAX: float(result.norms.max()), Column.BATCH_SIZE: x.shape[0]}  # fmt: skip
        row.update({Column.snr("net." + k): v for k, v in snr.layer_snr().items()})
        rows.append(row)
    return rows


def assert_rows_match(logged: list[dict], expected: list[dict], rel: float) -> None:
    assert len(logged) == len(expected) > 0
    for step, (got, want) in enumerate(zip(logged, expected)):
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=rel, abs=1e-12), f"step {step + 1}, {key}"


def micro_batches_by_step(seen: list, accumulate: int) -> list[list]:
    return [seen[i : i + accumulate] for i in range(0, len(seen), accumulate)]


@pytest.fixture(scope="module")
def accumulated(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("lightning")
    return tmp_path, *fit(tmp_path, accumulate=2, beta=BETA)


def test_logged_statistics_equal_pergrad_by_hand_with_accumulation(accumulated):
    tmp_path, module, callback, trainer = accumulated
    expected = by_hand(module.weights, micro_batches_by_step(module.seen, 2))
    assert len(expected) == 4  # 32 examples, micro-batches of 4, 2 per step
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert_rows_match(rows, expected, rel=1e-10)
    assert [r[Column.STEP] for r in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(r[Column.B_SIMPLE]) for r in rows[1:])
    # the same values reach trainer.callback_metrics (Lightning keeps them as float32)
    metrics = trainer.callback_metrics
    for key, value in expected[-1].items():
        if key != Column.BATCH_SIZE:
            assert float(metrics["pergrad/" + key]) == pytest.approx(value, rel=1e-6), key


def test_k_micro_batches_give_the_statistics_of_one_backward_of_the_whole_batch(tmp_path):
    one = read_metrics(fit(tmp_path / "k1", accumulate=1, batch_size=8, beta=BETA)[2].callbacks[0].run_dir / "metrics.csv")
    four = read_metrics(fit(tmp_path / "k4", accumulate=4, batch_size=2, beta=BETA)[2].callbacks[0].run_dir / "metrics.csv")
    stats = [k for k in one[0] if k not in (Column.LOSS,)]
    assert_rows_match([{k: r[k] for k in stats} for r in four], [{k: r[k] for k in stats} for r in one], rel=1e-10)
    assert [r[Column.LOSS] for r in four] == pytest.approx([r[Column.LOSS] for r in one], rel=1e-10)


def test_bf16_mixed_precision(tmp_path):
    module, callback, trainer = fit(tmp_path, accumulate=2, precision="bf16-mixed", beta=BETA)
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    expected = by_hand(module.weights, micro_batches_by_step(module.seen, 2))
    for got, want in zip(rows, expected):  # bfloat16 has 8 bits of mantissa
        for key in (Column.TRACE_SIGMA, "norm_q50", Column.NORM_MAX):
            assert got[key] == pytest.approx(want[key], rel=5e-2), key


def test_ddp_on_two_gloo_processes_merges_the_workers(tmp_path):
    ranks = run_two_workers("lightning_worker.py", tmp_path)
    assert all(torch.equal(a, b) for w0, w1 in zip(ranks[0]["weights"], ranks[1]["weights"]) for a, b in zip(w0.values(), w1.values()))
    steps = [s0 + s1 for s0, s1 in zip(*(micro_batches_by_step(r["seen"], 2) for r in ranks))]
    expected = by_hand(ranks[0]["weights"], steps)
    assert len(expected) == 2 and expected[0][Column.BATCH_SIZE] == 16  # 2 workers x 2 micro-batches x 4
    assert_rows_match(read_metrics(tmp_path / "run" / "metrics.csv"), expected, rel=1e-10)


def test_pergrad_report_builds_the_sections_a_callback_run_has(accumulated):
    tmp_path, *_ = accumulated
    run = tmp_path / "run"
    assert main(["report", str(run)]) == 0
    html = (run / "report.html").read_text()
    data = json.loads((run / "report_data.json").read_text())
    rows = read_metrics(run / "metrics.csv")
    for shown in ("summary", "curves", "noise-scale", "snr", "norms"):
        assert f'<section id="{shown}">' in html
    for left_out in ("assumptions", "cbs", "outliers", "unbiasedness"):
        assert f'<section id="{left_out}">' not in html and left_out in data["skipped"]
    assert data["framework"] == "lightning" and data["summary"]["settings"]["accumulate"] == 2
    assert data["noise-scale"]["batch_size"] == 8
    assert data["snr"]["last"]["net.0.weight"] == pytest.approx(rows[-1]["snr/net.0.weight"], rel=1e-12)
    assert data["norms"]["logged"]["max"] == pytest.approx(rows[-1][Column.NORM_MAX], rel=1e-12)


def test_measure_every_logs_only_measured_steps_smoothed_as_a_noise_scale_of_those_steps(tmp_path):
    """measure_every=2: steps 0 and 2 of 4 are measured. Their statistics are those of a NoiseScale
    updated on those steps alone (β per measured step); the other steps log no pergrad metric and
    their rows keep the loss with empty statistics."""
    from lightning_worker import Classifier

    class Recording(Classifier):
        def __init__(self, accumulate):
            super().__init__(accumulate)
            self.logged: list[tuple[int, set]] = []  # (global_step, pergrad keys) per log_dict call

        def log_dict(self, metrics, *args, **kwargs):
            self.logged.append((self.trainer.global_step, {k for k in metrics if k.startswith("pergrad/")}))
            return super().log_dict(metrics, *args, **kwargs)

    module = Recording(2)
    module, callback, trainer = fit(tmp_path, accumulate=2, beta=BETA, module=module, measure_every=2)
    steps = micro_batches_by_step(module.seen, 2)
    assert len(steps) == 4
    assert [s for s, keys in module.logged if keys] == [0, 2]
    expected = by_hand([module.weights[0], module.weights[2]], [steps[0], steps[2]])
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert [r[Column.STEP] for r in rows] == [1, 2, 3, 4]
    assert_rows_match([rows[0], rows[2]], expected, rel=1e-10)
    for unmeasured in (rows[1], rows[3]):
        assert unmeasured[Column.LOSS] is not None and math.isfinite(unmeasured[Column.LOSS])
        assert unmeasured[Column.B_SIMPLE] is None and unmeasured[Column.TRACE_SIGMA] is None
        assert unmeasured["norm_q50"] is None
    # the loss of every step, measured or not: the mean of its micro-batches' mean losses
    with torch.no_grad():
        losses = [sum(float(F.cross_entropy(_net(w)(x.double()), y)) for x, y in s) / 2 for w, s in zip(module.weights, steps)]
    assert [r[Column.LOSS] for r in rows] == pytest.approx(losses, rel=1e-10)
    assert callback.statistics.steps == 2 and callback._pe is None  # hooks removed at the end of fitting
    assert main(["report", str(tmp_path / "run")]) == 0
    html = (tmp_path / "run" / "report.html").read_text()
    assert "measure_every = 2" in html and "per measured step" in html


def _net(weights: dict) -> nn.Module:
    net = nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, C)).double()
    net.load_state_dict({k.removeprefix("net."): v.double() for k, v in weights.items()})
    return net
