"""The norm test (Byrd et al. 2012) and the AdaScale gain (Johnson et al. 2020)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pergrad.stats import adascale_gain, norm_test


def test_norm_test_threshold_and_suggested_batch_size():
    # tr Σ = 8, ‖g‖² = 0.5, θ = 0.5: tr Σ / (θ² ‖g‖²) = 64
    assert norm_test(8.0, 0.5, 64, theta=0.5) == (True, 1.0, 64.0)
    failed = norm_test(8.0, 0.5, 16, theta=0.5)
    assert not failed.passed and failed.ratio == 4.0 and failed.suggested_batch_size == 64.0
    assert norm_test(8.0, 0.5, 128, theta=0.5).passed


def test_norm_test_with_smoothed_estimates_suggests_b_simple_over_theta_squared():
    trace, grad, theta = 30.0, 2.5, 0.8
    assert norm_test(trace, grad, 10, theta=theta).suggested_batch_size == pytest.approx(trace / grad / theta**2)


def test_norm_test_without_signal_never_passes():
    assert norm_test(1.0, 0.0, 1000, theta=0.9) == (False, math.inf, math.inf)
    assert norm_test(1.0, -0.3, 1000, theta=0.9).suggested_batch_size == math.inf


@pytest.mark.parametrize(
    "args, match",
    [((1.0, 1.0, 8, 0.0), "theta"), ((1.0, 1.0, 0, 0.5), "batch_size"), ((math.nan, 1.0, 8, 0.5), "NaN")],
)
def test_norm_test_refuses_bad_input(args, match):
    trace, grad, batch, theta = args
    with pytest.raises(ValueError, match=match):
        norm_test(trace, grad, batch, theta=theta)


def test_adascale_gain_limits():
    assert adascale_gain(5.0, 1.0, scale=1, base_batch_size=32) == 1.0
    assert adascale_gain(5.0, 0.0, scale=8, base_batch_size=32) == 8.0  # pure noise: linear scaling
    assert adascale_gain(0.0, 1.0, scale=8, base_batch_size=32) == 1.0  # no noise: nothing to gain
    assert adascale_gain(5.0, -1.0, scale=8, base_batch_size=32) == 8.0  # |G|² estimate clipped at 0


@settings(max_examples=50, deadline=None, derandomize=True)
@given(
    st.floats(1e-6, 1e6), st.floats(1e-6, 1e6), st.floats(1.0, 1e3), st.integers(1, 4096),
)
def test_adascale_gain_in_one_to_scale_and_a_function_of_b_simple(trace, grad, scale, base):
    r = adascale_gain(trace, grad, scale=scale, base_batch_size=base)
    assert 1.0 - 1e-12 <= r <= scale * (1 + 1e-12)
    b = trace / grad
    assert r == pytest.approx((b / base + 1) / (b / (scale * base) + 1), rel=1e-9)


@pytest.mark.parametrize(
    "args, match",
    [((1.0, 1.0, 0.5, 1), "scale"), ((1.0, 1.0, 2.0, 0), "base_batch_size"), ((0.0, 0.0, 2.0, 1), "undefined"),
     ((1.0, math.nan, 2.0, 1), "NaN")],
)
def test_adascale_gain_refuses_bad_input(args, match):
    trace, grad, scale, base = args
    with pytest.raises(ValueError, match=match):
        adascale_gain(trace, grad, scale=scale, base_batch_size=base)
