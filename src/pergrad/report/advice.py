"""Batch-size advice from the logged noise scale B_simple, or from a measured B_crit.

B_simple = tr Σ / |G|² is the batch size at which the mini-batch gradient's noise
(tr Σ / B) equals its signal (|G|²). Well below it, doubling B nearly halves the noise of each
step; well above it, extra examples buy little (McCandlish et al. 2018, arXiv:1812.06162).
B_simple predicts the critical batch size B_crit; where ``pergrad cbs`` measured B_crit, the
advice compares the batch size with the measurement instead, and says so.

References:
    McCandlish, Kaplan, Amodei et al. (2018), "An Empirical Model of Large-Batch Training",
    arXiv:1812.06162.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ._format import number

__all__ = ["BatchSizeAdvice", "advise_batch_size", "TAIL", "FACTOR"]

TAIL = 0.25  # the advice reads the last quarter of the logged B_simple values
FACTOR = 2.0  # "too small" when B_simple > FACTOR·B, "wasteful" when B > FACTOR·B_simple

TOO_SMALL, ABOUT_RIGHT, WASTEFUL, UNKNOWN = "too small", "about right", "wasteful", "unknown"


@dataclass(frozen=True)
class BatchSizeAdvice:
    """What the noise scale says about the batch size, and the numbers it used.

    Attributes:
        verdict: "too small", "about right", "wasteful", or "unknown" (no B_simple logged).
        batch_size: B, examples per step.
        b_simple: median of the B_simple values used (``inf`` if most are unbounded; NaN
            when unknown).
        b_simple_low, b_simple_high: medians of the interval bounds on the same rows (NaN
            where not logged).
        first_step, last_step: the steps of the first and last row used (0 when unknown).
        n_values: how many logged B_simple values the median is over.
        n_logged: how many rows had a B_simple value at all.
        message: the advice in plain words, with the numbers.
        basis: the predictor the verdict compares B with: "B_simple", "B_P" (Adam: the noise
            scale in Adam's metric), or "B_crit" when it compares B with a measured B_crit.
            ``b_simple`` and its interval are then that predictor's medians.
    """

    verdict: str
    batch_size: int
    b_simple: float
    b_simple_low: float
    b_simple_high: float
    first_step: int
    last_step: int
    n_values: int
    n_logged: int
    message: str
    basis: str = "B_simple"


def advise_batch_size(
    steps: np.ndarray,
    b_simple: np.ndarray,
    low: np.ndarray,
    high: np.ndarray,
    batch_size: int,
    tail: float = TAIL,
    factor: float = FACTOR,
    b_crit: tuple[float, float, float] | None = None,
    predictor: str = "B_simple",
    why: str = "",
) -> BatchSizeAdvice:
    """Compare the batch size with the median noise scale over the last part of training.

    Args:
        steps: (rows,) the logged steps.
        b_simple: (rows,) B_simple per row; NaN where not logged yet, ``inf`` where the signal
            estimate |G|² was not positive (noise dominates).
        low, high: (rows,) its interval bounds, NaN where missing.
        batch_size: B.
        tail: share of the rows *with* a B_simple value that the median reads, from the end.
        factor: the margin either side of "about right".
        b_crit: (B_crit, low, high) measured by ``pergrad cbs``, or None. When its interval is
            bounded the verdict compares B with B_crit; when only its lower end is measured
            (high = inf) it does so only if that lower end already exceeds factor·B.
        predictor: the name of the noise scale given as ``b_simple``: "B_simple", or "B_P" for
            the preconditioned one of Adam.
        why: a sentence saying why this predictor suits the run's optimizer, put first.

    Returns:
        A :class:`BatchSizeAdvice`.
    """
    present = ~np.isnan(b_simple)
    n_logged = int(present.sum())
    if n_logged == 0:
        message = (
            "No noise-scale estimate was logged yet (it needs a few steps of statistics): "
            "train longer, or log more often with a smaller log_every, then rebuild the report."
        )
        nan = float("nan")
        return BatchSizeAdvice(UNKNOWN, batch_size, nan, nan, nan, 0, 0, 0, 0, message)

    rows = np.flatnonzero(present)
    rows = rows[-max(1, math.ceil(tail * n_logged)) :]
    median = float(np.median(b_simple[rows]))  # inf sorts last, so it counts as "very large"
    med_low, med_high = (_nanmedian(v[rows]) for v in (low, high))
    first, last = int(steps[rows[0]]), int(steps[rows[-1]])

    if b_crit is not None:
        measured = _measured_advice(b_crit, batch_size, factor)
        if measured is not None:
            verdict, message = measured
            return BatchSizeAdvice(
                verdict, batch_size, median, med_low, med_high, first, last, len(rows), n_logged,
                f"{why}{message} ({predictor}, which predicts it, has median {number(median)} over the last "
                f"{len(rows)} of {n_logged} logged values.)",
                basis="B_crit",
            )  # fmt: skip
    if median > factor * batch_size:
        verdict = TOO_SMALL
    elif batch_size > factor * median:
        verdict = WASTEFUL
    else:
        verdict = ABOUT_RIGHT
    used = (
        f"median {predictor} = {number(median)} over the last {len(rows)} of {n_logged} logged "
        f"values (steps {first}–{last}; median interval {number(med_low)}–{number(med_high)}), "
        f"batch size B = {batch_size}"
    )
    if verdict == TOO_SMALL:
        if math.isinf(median):
            reason = (
                "the gradient's signal estimate |G|² was not even positive on most of these steps: "
                "the noise of a batch swamps the signal."
            )
        else:
            reason = f"{predictor} is more than {factor:g}× the batch size."
        message = (
            f"The batch is too small: {reason} More examples per step would still reduce the "
            "noise almost linearly, so a larger batch (with a proportionally larger learning "
            "rate) would make about as much progress per example in fewer steps."
        )
    elif verdict == WASTEFUL:
        message = (
            f"The batch is larger than it needs to be: B is more than {factor:g}× {predictor}. "
            f"Beyond {predictor}, each extra example barely reduces the noise that matters, so "
            f"about {number(median)} examples per step with more steps would reach the same loss "
            "on fewer examples."
        )
    else:
        message = (
            f"The batch size is about right: B is within a factor {factor:g} of {predictor}. "
            "A larger batch would give diminishing returns per example; a smaller one, noisier "
            "steps."
        )
    if b_crit is not None:
        message += (
            f" (The measured B_crit is at least {number(b_crit[1])}, not bounded above,"
            f" so the advice reads {predictor}.)"
        )
    return BatchSizeAdvice(
        verdict, batch_size, median, med_low, med_high, first, last, len(rows), n_logged,
        f"{why}{message} Numbers used: {used}.", basis=predictor,
    )  # fmt: skip


def _measured_advice(b_crit: tuple[float, float, float], batch_size: int, factor: float) -> tuple[str, str] | None:
    """(verdict, message) from a measured B_crit, or None when the measurement cannot decide."""
    value, low, high = b_crit
    used = (
        f"Numbers used: the measured critical batch size B_crit = {number(value)} (interval "
        f"{number(low)}–{number(high)}, from pergrad cbs), batch size B = {batch_size}."
    )
    if math.isinf(high):
        if low > factor * batch_size:
            return TOO_SMALL, (
                f"The batch is too small: the measured B_crit is at least {number(low)}, more than "
                f"{factor:g}× the batch size; larger batches would still cut the steps almost in "
                f"proportion. {used}"
            )
        return None
    if value > factor * batch_size:
        return TOO_SMALL, (
            f"The batch is too small: the measured B_crit is more than {factor:g}× the batch size, "
            f"so a larger batch would reach the target in proportionally fewer steps at little "
            f"cost in examples. {used}"
        )
    if batch_size > factor * value:
        return WASTEFUL, (
            f"The batch is larger than it needs to be: B is more than {factor:g}× the measured "
            f"B_crit; about {number(value)} examples per step would reach the same loss on fewer "
            f"examples. {used}"
        )
    return ABOUT_RIGHT, (
        f"The batch size is about right: B is within a factor {factor:g} of the measured B_crit. {used}"
    )


def _nanmedian(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(np.median(values)) if values.size else float("nan")
