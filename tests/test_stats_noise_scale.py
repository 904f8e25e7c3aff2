"""NoiseState / NoiseScale: smoothing, merging, intervals and the cases where B_simple is not a number."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import pergrad
from pergrad.stats import BatchEstimate, NoiseScale, NoiseState, StatsWarning, batch_estimate, two_batch_estimate


def _estimates(steps: int, k: int = 3, seed: int = 0) -> list[BatchEstimate]:
    """Random per-batch estimates with a positive mean, (k,) each."""
    gen = torch.Generator().manual_seed(seed)
    t = 2.0 + torch.rand(steps, k, dtype=torch.float64, generator=gen)
    g = 0.5 + 0.3 * torch.randn(steps, k, dtype=torch.float64, generator=gen)
    return [BatchEstimate(a, b) for a, b in zip(t, g)]


def _fold(estimates, beta: float, k: int = 3) -> NoiseState:
    state = NoiseState.init(k)
    for e in estimates:
        state = state.update(e, beta)
    return state


def test_smoothing_is_adams_bias_corrected_ema():
    estimates, beta = _estimates(30), 0.9
    m = torch.zeros(3, dtype=torch.float64)
    for t, e in enumerate(estimates, start=1):
        m = beta * m + (1 - beta) * e.trace_sigma
    final = _fold(estimates, beta).finalize()
    torch.testing.assert_close(final.trace_sigma, m / (1 - beta**30), rtol=1e-12, atol=0)


def test_beta_one_is_the_plain_average_with_its_standard_error():
    estimates = _estimates(40)
    final = _fold(estimates, 1.0).finalize()
    t = torch.stack([e.trace_sigma for e in estimates])
    torch.testing.assert_close(final.trace_sigma, t.mean(0), rtol=1e-12, atol=0)
    torch.testing.assert_close(final.effective_batches, torch.full((3,), 40.0, dtype=torch.float64))


def test_merging_workers_equals_one_state_over_all_batches():
    estimates = _estimates(20)
    merged = _fold(estimates[:7], 1.0).merge(_fold(estimates[7:], 1.0))
    single = _fold(estimates, 1.0)
    for a, b in zip(merged, single):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # the merge is one sum of stacked fields: what an all_reduce(SUM) computes
    stacked = torch.stack(tuple(_fold(estimates[:7], 1.0))) + torch.stack(tuple(_fold(estimates[7:], 1.0)))
    for a, b in zip(NoiseState(*stacked), merged):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_merging_workers_at_the_same_steps_smooths_their_average():
    a, b, beta = _estimates(25, seed=1), _estimates(25, seed=2), 0.95
    merged = _fold(a, beta).merge(_fold(b, beta)).finalize()
    averaged = [BatchEstimate(*((u + v) / 2 for u, v in zip(x, y))) for x, y in zip(a, b)]
    single = _fold(averaged, beta).finalize()
    torch.testing.assert_close(merged.trace_sigma, single.trace_sigma, rtol=1e-12, atol=0)
    torch.testing.assert_close(merged.grad_sq_norm, single.grad_sq_norm, rtol=1e-12, atol=0)
    torch.testing.assert_close(merged.effective_batches, 2 * single.effective_batches, rtol=1e-12, atol=0)


def _stream(n_batches: int, n: int = 6, seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    xs = torch.randn(n_batches, n, 3, dtype=torch.float64)
    with pergrad.PerExample(model) as pe:
        for x in xs:
            model.zero_grad()
            yield pe.backward(model(x).square().sum(1) + x.sum(1))


def test_noise_scale_merge_equals_one_noise_scale_over_all_batches():
    results = list(_stream(12))
    single, first, second = NoiseScale(1.0), NoiseScale(1.0), NoiseScale(1.0)
    for i, r in enumerate(results):
        single.update(r)
        (first if i < 5 else second).update(r)
    first.merge(second)
    assert first.names == single.names == tuple(results[0].param_sq_norms)
    for a, b in zip(first.state, single.state):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert first.param_estimates().keys() == single.param_estimates().keys()
    empty = NoiseScale(1.0)
    empty.merge(single)
    assert empty.b_simple == single.b_simple


def test_b_simple_is_the_ratio_of_the_smoothed_estimates_not_their_mean_ratio():
    """(tr Σ̂, |G|²̂) = (2, 0.2) then (4, 0.6), unsmoothed: 3 / 0.4 = 7.5 (the mean ratio would be 8.3)."""
    noise = NoiseScale(1.0)
    noise.update_estimate(BatchEstimate(2.0, 0.2))
    noise.update_estimate(BatchEstimate(4.0, 0.6))
    assert noise.b_simple == pytest.approx(7.5, rel=1e-12)


def test_b_simple_interval_and_effective_batches():
    noise = NoiseScale(0.9)
    for r in _stream(10):
        noise.update(r)
    lower, upper = noise.interval(0.9)
    assert lower <= noise.b_simple <= upper
    wide = noise.interval(0.99)
    assert wide[0] <= lower and upper <= wide[1]
    weight, weight_sq = (1 - 0.9**10) / (1 - 0.9), (1 - 0.81**10) / (1 - 0.81)
    assert noise.effective_batches == pytest.approx(weight**2 / weight_sq, rel=1e-12)


def test_totals_equal_the_per_batch_estimates_for_one_batch():
    result = next(_stream(1))
    noise = NoiseScale()
    noise.update(result)
    est = batch_estimate(result)
    assert (noise.trace_sigma, noise.grad_sq_norm) == pytest.approx(tuple(est), rel=1e-12)
    assert noise.interval() == (0.0, math.inf)  # one batch: its variance is unknown


def test_noise_dominated_gradient_gives_an_unbounded_b_simple_with_a_note():
    noise = NoiseScale(1.0)
    for g in (-0.2, 0.1, -0.15):
        noise.update_estimate(BatchEstimate(2.0, g))
    assert noise.grad_sq_norm < 0
    assert noise.b_simple == math.inf
    assert "unbounded" in noise.b_simple_note and "noise dominates" in noise.b_simple_note
    assert noise.interval()[1] == math.inf


def test_unclear_signal_gives_an_interval_unbounded_above():
    noise = NoiseScale(1.0)
    for g in (0.5, -0.3, 0.4, -0.2):  # mean 0.1, far from clearly positive
        noise.update_estimate(BatchEstimate(2.0, g))
    assert 0 < noise.b_simple < math.inf and noise.b_simple_note is None
    lower, upper = noise.interval()
    assert upper == math.inf and 0 <= lower <= noise.b_simple


def test_negative_two_batch_noise_estimate_reports_zero_with_a_note():
    noise = NoiseScale(1.0)
    noise.update_estimate(two_batch_estimate(1.0, 1.1, 8, 64))  # big batch noisier than small: tr Σ̂ < 0
    assert noise.b_simple == 0.0
    assert "reported as 0" in noise.b_simple_note


def test_before_any_batch_everything_is_nan_with_a_note():
    noise = NoiseScale()
    assert math.isnan(noise.b_simple) and math.isnan(noise.trace_sigma)
    assert "no batch" in noise.b_simple_note
    assert noise.param_estimates() == {}


def test_batch_of_one_is_skipped_with_a_warning():
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    noise = NoiseScale()
    with pergrad.PerExample(model) as pe:
        result = pe.backward(model(torch.randn(1, 3, dtype=torch.float64)).square().sum(1))
    with pytest.warns(StatsWarning, match="n=1"):
        noise.update(result)
    assert noise.state is None


def test_refuses_mixed_sources_and_bad_arguments():
    noise = NoiseScale()
    noise.update(next(_stream(1)))
    with pytest.raises(ValueError, match="update_estimate"):
        noise.update_estimate(BatchEstimate(1.0, 1.0))
    with pytest.raises(ValueError, match="merge"):
        noise.merge(NoiseScale(beta=0.5))
    with pytest.raises(ValueError, match="beta"):
        NoiseScale(beta=0.0)
    with pytest.raises(ValueError, match="level"):
        noise.interval(1.0)
    with pytest.raises(ValueError, match="finite"):
        NoiseState.init(1).update(BatchEstimate(torch.tensor([math.nan]), torch.tensor([1.0])), 0.9)
    with pytest.raises(ValueError, match="shape"):
        NoiseState.init(2).update(BatchEstimate(torch.ones(3), torch.ones(3)), 0.9)


def test_state_dict_round_trip_through_a_checkpoint(tmp_path):
    noise = NoiseScale(0.9)
    for r in _stream(5):
        noise.update(r)
    torch.save(noise.state_dict(), tmp_path / "noise.pt")
    restored = NoiseScale(0.9)
    restored.load_state_dict(torch.load(tmp_path / "noise.pt", weights_only=True))
    assert restored.names == noise.names
    assert restored.estimate() == noise.estimate()
    assert restored.param_estimates() == noise.param_estimates()
    fresh = NoiseScale(0.9)
    fresh.load_state_dict(NoiseScale(0.9).state_dict())
    assert fresh.state is None
    with pytest.raises(ValueError, match="saved NoiseScale"):
        NoiseScale(0.5).load_state_dict(noise.state_dict())

