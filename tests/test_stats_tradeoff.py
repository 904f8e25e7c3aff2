"""fit_tradeoff against sweeps drawn from the hyperbola S(B) = S_min (1 + B_crit/B) with noise."""

import math

import numpy as np
import pytest

from pergrad.stats import fit_tradeoff

BATCHES = 2.0 ** np.arange(1, 11)  # 2 … 1024
S_MIN = 120.0


def sweep(b_crit: float, seeds: int = 3, noise: float = 0.04, rng_seed: int = 0):
    """(steps, examples, seeds): each seed's steps at every batch size, log-normal relative noise."""
    rng = np.random.default_rng(rng_seed)
    b = np.tile(BATCHES, seeds)
    steps = S_MIN * (1 + b_crit / b) * np.exp(noise * rng.standard_normal(b.size))
    return steps, steps * b, np.repeat(np.arange(seeds), BATCHES.size)


def test_exact_points_give_the_parameters():
    steps, examples, _ = sweep(50.0, seeds=1, noise=0.0)
    fit = fit_tradeoff(steps, examples)
    assert fit.s_min == pytest.approx(S_MIN, rel=1e-10)
    assert fit.e_min == pytest.approx(S_MIN * 50.0, rel=1e-10)
    assert fit.b_crit == pytest.approx(50.0, rel=1e-10)
    np.testing.assert_allclose(fit.residuals, 0.0, atol=1e-10)
    np.testing.assert_allclose(fit.steps(BATCHES), steps, rtol=1e-10)
    assert fit.interval is None and fit.bounded


@pytest.mark.parametrize("b_crit", [6.0, 40.0, 250.0, 900.0])
@pytest.mark.parametrize("rng_seed", [0, 1])
def test_noisy_sweeps_recover_s_min_and_b_crit_within_5_percent(b_crit, rng_seed):
    steps, examples, seeds = sweep(b_crit, rng_seed=rng_seed)
    fit = fit_tradeoff(steps, examples, seeds=seeds, n_boot=300)
    assert fit.s_min == pytest.approx(S_MIN, rel=0.05)
    assert fit.b_crit == pytest.approx(b_crit, rel=0.05)
    low, high = fit.interval
    assert low <= fit.b_crit <= high and 0.8 * b_crit < low and high < 1.25 * b_crit and fit.bounded
    # the residuals are the noise: about 4 % relative
    assert 0.02 < np.std(fit.residuals) < 0.06


@pytest.mark.parametrize("rng_seed", [0, 1, 2])
def test_a_b_crit_beyond_the_largest_batch_is_a_lower_bound_not_a_number(rng_seed):
    """B_crit = 10⁶ ≫ 1024: the sweep is all perfect scaling; the fit must say 'at least'."""
    steps, examples, seeds = sweep(1e6, rng_seed=rng_seed)
    fit = fit_tradeoff(steps, examples, seeds=seeds, n_boot=300)
    low, high = fit.interval
    assert not fit.bounded and high == math.inf
    assert BATCHES.max() < low < 1e6
    # E_min is still measured: the examples per step are all useful
    assert fit.e_min == pytest.approx(S_MIN * 1e6, rel=0.05)


def test_pure_one_over_b_puts_s_min_at_zero():
    steps = 1e4 / BATCHES
    fit = fit_tradeoff(steps, steps * BATCHES)
    assert fit.s_min == 0.0 and fit.b_crit == math.inf and not fit.bounded
    assert fit.e_min == pytest.approx(1e4, rel=1e-10)


def test_constant_steps_give_b_crit_zero():
    steps = np.full(BATCHES.size, 30.0)
    fit = fit_tradeoff(steps, steps * BATCHES)
    assert fit.s_min == pytest.approx(30.0, rel=1e-10) and fit.b_crit == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize(
    "steps, examples, match",
    [
        ([10.0, 20.0], [100.0], "same length"),
        ([10.0, math.inf], [100.0, 200.0], "finite and positive"),
        ([10.0, 0.0], [100.0, 200.0], "finite and positive"),
        ([10.0, 20.0], [100.0, 200.0], "two distinct batch sizes"),
    ],
)
def test_bad_input_is_refused(steps, examples, match):
    with pytest.raises(ValueError, match=match):
        fit_tradeoff(steps, examples)


def test_bad_confidence_and_seed_labels_are_refused():
    steps, examples, seeds = sweep(50.0)
    with pytest.raises(ValueError, match="confidence"):
        fit_tradeoff(steps, examples, confidence=1.0)
    with pytest.raises(ValueError, match="label each point"):
        fit_tradeoff(steps, examples, seeds=seeds[:-1])
