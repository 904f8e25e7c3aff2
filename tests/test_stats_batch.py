"""Per-batch estimates: identities with the engine's result, reductions, and the finite-population correction."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

import pergrad
from pergrad.stats import (
    StatsWarning,
    batch_estimate,
    mean_grad_sq_norm,
    param_batch_estimates,
    two_batch_estimate,
)


def _result(n: int, reduction: str = "mean", seed: int = 0, grads: bool = False):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x, y = torch.randn(n, 3, dtype=torch.float64), torch.randn(n, 2, dtype=torch.float64)
    with pergrad.PerExample(model, grads=grads) as pe:
        return pe.backward((model(x) - y).square().sum(1), reduction=reduction)


def test_per_example_estimate_from_the_result():
    result = _result(7, grads=True)
    g = torch.cat([v.reshape(7, -1) for v in result.grads.values()], 1)  # (n, all parameters)
    mean_sq, batch_sq = g.square().sum(1).mean(), g.mean(0).square().sum()
    assert mean_grad_sq_norm(result) == pytest.approx(float(batch_sq), rel=1e-12)
    est = batch_estimate(result)
    assert est.trace_sigma == pytest.approx(7 / 6 * float(mean_sq - batch_sq), rel=1e-12)
    assert est.grad_sq_norm == pytest.approx(float(batch_sq) - est.trace_sigma / 7, rel=1e-12)
    # the sample covariance's trace, computed directly
    assert est.trace_sigma == pytest.approx(float(torch.cov(g.T).trace()), rel=1e-12)


@pytest.mark.parametrize("population_size", [None, 50])
def test_sum_and_mean_reductions_give_the_same_estimates(population_size):
    mean = param_batch_estimates(_result(6, "mean"), population_size)
    summed = param_batch_estimates(_result(6, "sum"), population_size)
    for name in mean:
        assert summed[name].trace_sigma == pytest.approx(mean[name].trace_sigma, rel=1e-12)
        assert summed[name].grad_sq_norm == pytest.approx(mean[name].grad_sq_norm, rel=1e-12)


def test_per_parameter_estimates_sum_to_the_total():
    result = _result(5)
    total, params = batch_estimate(result), param_batch_estimates(result)
    assert list(params) == list(result.param_sq_norms)
    assert sum(e.trace_sigma for e in params.values()) == pytest.approx(total.trace_sigma, rel=1e-12)
    assert sum(e.grad_sq_norm for e in params.values()) == pytest.approx(total.grad_sq_norm, rel=1e-12)


def test_two_batch_formula_of_mccandlish_et_al():
    small, big, b_small, b_big = 3.0, 1.2, 8, 64
    est = two_batch_estimate(small, big, b_small, b_big)
    assert est.grad_sq_norm == pytest.approx((b_big * big - b_small * small) / (b_big - b_small), rel=1e-14)
    assert est.trace_sigma == pytest.approx((small - big) / (1 / b_small - 1 / b_big), rel=1e-14)


def test_per_example_estimator_is_the_two_batch_estimator_with_batches_of_one():
    result = _result(9)
    est = two_batch_estimate(float(result.sq_norms.mean()), mean_grad_sq_norm(result), 1, 9)
    assert tuple(est) == pytest.approx(tuple(batch_estimate(result)), rel=1e-12)


def test_one_example_gives_nan_with_a_warning():
    result = _result(1)
    with pytest.warns(StatsWarning, match="n=1"):
        est = batch_estimate(result)
    assert math.isnan(est.trace_sigma) and math.isnan(est.grad_sq_norm)
    with pytest.warns(StatsWarning, match="n=1"):
        assert all(math.isnan(e.trace_sigma) for e in param_batch_estimates(result).values())


@pytest.mark.parametrize(
    "sizes, match",
    [((4, 4, None), "small_size < big_size"), ((0, 4, None), "small_size < big_size"), ((2, 8, 6), "population")],
)
def test_two_batch_refuses_bad_sizes(sizes, match):
    with pytest.raises(ValueError, match=match):
        two_batch_estimate(1.0, 0.5, *sizes)


# Finite population: N fixed per-example gradients; a batch of n drawn without replacement is
# any of the N!/(N−n)! ordered draws, equally likely, so the average over all of them is exact.
N, DIM = 9, 3


def _population():
    g = torch.randn(N, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(7)) + 0.3
    mean = g.mean(0)
    return g, float(mean.square().sum()), float((g - mean).square().sum(1).mean())  # Σ with divisor N


def _over_all_draws(n, estimate):
    g, _, _ = _population()
    est = [estimate(g[list(s)]) for s in itertools.permutations(range(N), n)]
    return sum(e.trace_sigma for e in est) / len(est), sum(e.grad_sq_norm for e in est) / len(est)


def _per_example(batch, population_size):
    n = batch.shape[0]
    return two_batch_estimate(batch.square().sum(1).mean(), batch.mean(0).square().sum(), 1, n, population_size)


def test_finite_population_correction_is_exactly_unbiased_without_replacement():
    _, grad_sq, trace = _population()
    corrected = _over_all_draws(4, lambda b: _per_example(b, N))
    assert corrected == pytest.approx((trace, grad_sq), rel=1e-12)
    uncorrected = _over_all_draws(4, lambda b: _per_example(b, None))
    assert uncorrected[0] == pytest.approx(trace * N / (N - 1), rel=1e-12)  # biased by N/(N−1)
    assert abs(uncorrected[1] - grad_sq) > 0.01 * grad_sq


def test_finite_population_correction_is_exact_on_the_whole_population():
    g, grad_sq, trace = _population()
    est = _per_example(g, N)
    assert (float(est.trace_sigma), float(est.grad_sq_norm)) == pytest.approx((trace, grad_sq), rel=1e-12)


def test_two_batch_finite_population_correction_is_exactly_unbiased():
    _, grad_sq, trace = _population()

    def halves(batch):  # micro-batches of 2 inside a batch of 4
        small = (batch[:2].mean(0).square().sum() + batch[2:].mean(0).square().sum()) / 2
        return two_batch_estimate(small, batch.mean(0).square().sum(), 2, 4, population_size=N)

    assert _over_all_draws(4, halves) == pytest.approx((trace, grad_sq), rel=1e-12)
