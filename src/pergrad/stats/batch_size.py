"""What the gradient noise says about the batch size: the norm test and the AdaScale gain.

Both take tr Σ (per-example gradient variance, summed over parameters) and a squared gradient
norm, from one batch (:func:`~pergrad.stats.batch_estimate`) or smoothed
(:class:`~pergrad.stats.NoiseScale`), and both depend on them only through their ratio, the
noise scale B = tr Σ / |G|².

References:
    Byrd, Chin, Nocedal and Wu 2012, "Sample size selection in optimization methods for machine
    learning", Mathematical Programming 134(1):127-155 (the norm test).
    Johnson, Agrawal, Gu and Guestrin 2020, "AdaScale SGD: A User-Friendly Algorithm for
    Distributed Training", ICML, arXiv:2007.05105 (the gain ratio).
    McCandlish et al. 2018, arXiv:1812.06162 (B_simple).
"""

from __future__ import annotations

import math
from typing import NamedTuple

__all__ = ["NormTest", "adascale_gain", "norm_test"]


class NormTest(NamedTuple):
    """Outcome of the norm test.

    Attributes:
        passed: tr Σ / B ≤ θ² ‖g‖²: the batch gradient's expected error is at most θ times its
            norm, so the batch is large enough.
        ratio: (tr Σ / B) / (θ² ‖g‖²), the test passes when ≤ 1; inf when ‖g‖² ≤ 0.
        suggested_batch_size: tr Σ / (θ² ‖g‖²), the smallest batch that would pass (a float;
            round up); inf when ‖g‖² ≤ 0.
    """

    passed: bool
    ratio: float
    suggested_batch_size: float


def norm_test(trace_sigma: float, grad_sq_norm: float, batch_size: int, *, theta: float) -> NormTest:
    """The norm test of Byrd et al. (2012) and the batch size it suggests.

    Byrd et al. ask that the batch gradient ḡ of B examples be a descent direction with high
    probability, E‖ḡ − G‖² ≤ θ² ‖ḡ‖², and estimate E‖ḡ − G‖² = tr Σ / B from the batch's sample
    variance. Their test uses the batch's own ‖ḡ‖² (:func:`~pergrad.stats.mean_grad_sq_norm`);
    passing the unbiased, smoothed |G|² of :class:`~pergrad.stats.NoiseScale` instead gives a
    less noisy test whose suggested batch size is B_simple / θ².

    Args:
        trace_sigma: tr Σ̂ (clipped at 0 when a two-batch estimate is negative).
        grad_sq_norm: ‖ḡ‖² of the batch, or a smoothed |G|²̂.
        batch_size: B, the batch size tested.
        theta: θ > 0; smaller asks for more accurate gradients (larger batches).

    Returns:
        A :class:`NormTest`.

    Raises:
        ValueError: θ ≤ 0, B < 1, or a NaN estimate (e.g. from a batch of one example).

    References:
        Byrd, Chin, Nocedal and Wu 2012, Math. Program. 134(1):127-155.
    """
    if theta <= 0:
        raise ValueError(f"theta must be > 0, got {theta}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    _check_not_nan(trace_sigma, grad_sq_norm)
    if grad_sq_norm <= 0:
        return NormTest(False, math.inf, math.inf)
    suggested = max(trace_sigma, 0.0) / (theta**2 * grad_sq_norm)
    ratio = suggested / batch_size
    return NormTest(ratio <= 1.0, ratio, suggested)


def adascale_gain(trace_sigma: float, grad_sq_norm: float, *, scale: float, base_batch_size: int) -> float:
    """The AdaScale gain ratio r = (σ² + μ²) / (σ²/S + μ²) of Johnson et al. (2020).

    Scaling a batch of B₀ examples up S times divides the gradient variance σ² = tr Σ / B₀ by S;
    AdaScale then stretches the learning-rate schedule by r ∈ [1, S]: r ≈ S while noise
    dominates (linear scaling), r ≈ 1 once it is negligible. With B = tr Σ / μ²,
    r = (B/B₀ + 1) / (B/(S B₀) + 1).

    Args:
        trace_sigma: tr Σ̂, the per-example variance (clipped at 0).
        grad_sq_norm: μ² = |G|²̂ (clipped at 0, which gives r = S).
        scale: S ≥ 1, the factor by which the batch is scaled.
        base_batch_size: B₀, the batch size that S scales; σ² = tr Σ / B₀.

    Returns:
        r, in [1, S].

    Raises:
        ValueError: S < 1, B₀ < 1, a NaN estimate, or neither noise nor gradient (σ² = μ² = 0).

    References:
        Johnson, Agrawal, Gu and Guestrin 2020, "AdaScale SGD", ICML, arXiv:2007.05105.
    """
    if scale < 1:
        raise ValueError(f"scale must be >= 1 (the batch is scaled up), got {scale}.")
    if base_batch_size < 1:
        raise ValueError(f"base_batch_size must be >= 1, got {base_batch_size}.")
    _check_not_nan(trace_sigma, grad_sq_norm)
    variance = max(trace_sigma, 0.0) / base_batch_size
    signal = max(grad_sq_norm, 0.0)
    if variance + signal == 0:
        raise ValueError("tr Σ and |G|² are both 0: the gain is undefined (no gradient and no noise).")
    return (variance + signal) / (variance / scale + signal)


def _check_not_nan(trace_sigma: float, grad_sq_norm: float) -> None:
    if math.isnan(trace_sigma) or math.isnan(grad_sq_norm):
        raise ValueError(
            f"estimates are NaN (tr Σ = {trace_sigma}, |G|² = {grad_sq_norm}): a batch of one "
            "example, or a NoiseScale that has seen no batch, has no variance to test."
        )
