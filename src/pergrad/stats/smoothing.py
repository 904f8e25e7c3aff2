"""The smoothing factor β shared by the streaming statistics and the trainer's settings.

Batch b of t gets weight β^(t−b) in the statistics' bias-corrected averages: β = 1 weighs all
batches equally, smaller β forgets faster, and β = 0 would keep nothing (0⁰ is undefined).

With statistics measured only every k-th optimizer step (``measure_every = k``: steps 0, k, 2k, …,
the others paused), b and t count *measured* steps: β is applied once per measurement, so a
measurement's weight halves after log ½ / log β measurements, k times as many optimizer steps.
"""

from __future__ import annotations

import math

__all__ = ["check_beta", "check_measure_every", "is_measured", "describe_smoothing"]


def check_beta(beta: float, name: str = "beta") -> float:
    """Return ``beta`` if it is a valid smoothing factor, in (0, 1].

    Args:
        beta: the smoothing factor.
        name: how the message names the setting (the trainer's is ``noise_beta``).

    Raises:
        ValueError: ``beta`` is not a number in (0, 1], naming the range and what it means.
    """
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or math.isnan(beta) or not 0.0 < beta <= 1.0:
        raise ValueError(
            f"{name} must be in (0, 1] (the weight of each older batch; 1 averages all batches equally), got {beta}"
        )
    return beta


def check_measure_every(every: int, name: str = "measure_every") -> int:
    """Return ``every`` if it is a whole number ≥ 1 of optimizer steps between measurements.

    Raises:
        ValueError: naming the setting and what it means.
    """
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"{name} must be a whole number >= 1 (1: statistics at every optimizer step), got {every!r}")
    return every


def is_measured(step: int, every: int) -> bool:
    """Whether optimizer step ``step`` (0 for the first) is measured: steps 0, k, 2k, … for ``every`` = k."""
    return step % every == 0


def describe_smoothing(beta: float, every: int = 1) -> str:
    """One sentence on how the logged statistics are smoothed, for reports: β per measured step,
    which optimizer steps are measured, and the half-life in optimizer steps."""
    if beta >= 1.0:
        decay = "β = 1: every measured step weighs the same (plain averages)"
    else:
        half = math.log(0.5) / math.log(beta)
        decay = (
            f"β = {beta:g} per measured step (exponential averages; a measurement's weight halves after "
            f"{half:.3g} measured steps, {half * every:.3g} optimizer steps)"
        )
    if every == 1:
        return f"Statistics are measured at every optimizer step and smoothed with {decay}."
    return (
        f"Statistics are measured on one optimizer step in {every} (measure_every = {every}: steps 1, {every + 1}, "
        f"{2 * every + 1}, … counted from 1; the others run paused, unmeasured) and smoothed with {decay}; "
        "rows of metrics.csv with no measurement since the previous row leave the statistics empty."
    )
