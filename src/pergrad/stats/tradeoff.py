"""The steps–examples trade-off of McCandlish et al. (2018), and the critical batch size it defines.

Training to a fixed target loss with batch size B takes S(B) optimizer steps and E(B) = B·S(B)
examples. Across batch sizes the pairs lie on the hyperbola

    (S/S_min − 1)(E/E_min − 1) = 1,   equivalently   S(B) = S_min + E_min/B = S_min (1 + B_crit/B),

where S_min is the fewest steps (infinite batch) and E_min the fewest examples (tiny batches).
The critical batch size B_crit = E_min / S_min is where both are twice their minimum: below it
a larger batch saves steps almost for free, above it it mostly costs examples.

The fit: S = a + c/B is linear in (a, c) = (S_min, E_min). Steps are measured with relative
noise, so the squares are weighted by 1/Ŝ², with Ŝ the fitted steps (iteratively reweighted
least squares, a few rounds), under a ≥ 0 and c ≥ 0. When the batches tried never leave the
perfect-scaling regime (S ∝ 1/B), S_min is not distinguishable from 0: the fit puts it at 0 and
B_crit is infinite; the bootstrap interval is then unbounded above, and only its lower end is a
measurement (B_crit is at least that).

Interval: with several points per batch size (seeds), a bootstrap that resamples the points of
each batch size with replacement and refits; a percentile interval of the refitted 1/B_crit,
turned into one of B_crit whose upper end is infinite when enough refits find no curvature.

References:
    McCandlish, Kaplan, Amodei et al. 2018, "An Empirical Model of Large-Batch Training",
    arXiv:1812.06162 (eq. 2.11, the trade-off; Table 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["TradeoffFit", "fit_tradeoff"]

_ROUNDS = 5  # reweighting rounds of the least squares


@dataclass(frozen=True)
class TradeoffFit:
    """The fitted trade-off S(B) = S_min (1 + B_crit/B).

    Attributes:
        s_min: S_min ≥ 0, the fewest steps to the target (the infinite-batch limit).
        e_min: E_min ≥ 0, the fewest examples (the small-batch limit).
        b_crit: B_crit = E_min / S_min; inf when S_min = 0 (no curvature seen).
        batch_sizes: (points,) B = E/S of each point.
        residuals: (points,) relative residuals (S − Ŝ)/Ŝ.
        interval: (low, high) bootstrap percentile interval of B_crit at ``confidence``, high
            possibly inf; None without replicates.
        confidence: the interval's level.
    """

    s_min: float
    e_min: float
    b_crit: float
    batch_sizes: np.ndarray
    residuals: np.ndarray
    interval: tuple[float, float] | None
    confidence: float

    @property
    def bounded(self) -> bool:
        """Whether the data bound B_crit from above: a finite estimate and, if there is an
        interval, a finite upper end. Otherwise only ``interval[0]`` (a lower bound) is measured."""
        return math.isfinite(self.b_crit) and (self.interval is None or math.isfinite(self.interval[1]))

    def steps(self, batch_size: float | np.ndarray) -> float | np.ndarray:
        """Ŝ(B) = S_min + E_min / B, the fitted steps at batch size B."""
        return self.s_min + self.e_min / np.asarray(batch_size, dtype=np.float64)


def fit_tradeoff(
    steps,
    examples,
    *,
    seeds=None,
    confidence: float = 0.9,
    n_boot: int = 1000,
    rng_seed: int = 0,
) -> TradeoffFit:
    """Fit S(B) = S_min + E_min/B to measured (steps, examples) pairs.

    Args:
        steps: (points,) S, optimizer steps to the target loss (> 0, finite).
        examples: (points,) E = B·S, examples to the target loss (> 0, finite).
        seeds: (points,) labels of the replicate each point comes from (e.g. the training
            seed), or None. With at least two points at some batch size, a bootstrap over the
            points of each batch size gives ``interval``.
        confidence: level of the interval, in (0, 1).
        n_boot: bootstrap resamples.
        rng_seed: seeds the bootstrap.

    Returns:
        A :class:`TradeoffFit`.

    Raises:
        ValueError: arrays of different lengths, non-finite or non-positive values, fewer than
            two distinct batch sizes, or a confidence outside (0, 1).

    References:
        McCandlish et al. 2018, arXiv:1812.06162, eq. 2.11.
    """
    s = np.asarray(steps, dtype=np.float64).reshape(-1)
    e = np.asarray(examples, dtype=np.float64).reshape(-1)
    if s.shape != e.shape:
        raise ValueError(f"steps and examples must have the same length, got {s.size} and {e.size}.")
    if not (np.all(np.isfinite(s)) and np.all(np.isfinite(e)) and np.all(s > 0) and np.all(e > 0)):
        raise ValueError("steps and examples must be finite and positive: drop the runs that never reached the target.")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}.")
    b = e / s
    groups = _groups(b)
    if len(groups) < 2:
        raise ValueError("the trade-off needs at least two distinct batch sizes.")
    s_min, e_min = _fit(s, b)
    fitted = s_min + e_min / b
    interval = None
    if seeds is not None:
        if len(np.asarray(seeds).reshape(-1)) != s.size:
            raise ValueError(f"seeds must label each point, got {len(seeds)} labels for {s.size} points.")
        if any(len(g) > 1 for g in groups):
            interval = _bootstrap(s, b, groups, confidence, n_boot, rng_seed)
    return TradeoffFit(
        s_min=s_min,
        e_min=e_min,
        b_crit=_ratio(e_min, s_min),
        batch_sizes=b,
        residuals=(s - fitted) / fitted,
        interval=interval,
        confidence=confidence,
    )


def _fit(s: np.ndarray, b: np.ndarray, nonnegative: bool = True) -> tuple[float, float]:
    """(S_min, E_min) minimising Σ ((S − S_min − E_min/B) / Ŝ)², Ŝ the previous round's fit
    (the measured S in the first); both ≥ 0 when ``nonnegative``."""
    x = np.stack([np.ones_like(b), 1.0 / b], 1)  # (points, 2)
    scale = s
    coef = np.zeros(2)
    for _ in range(_ROUNDS):
        xw, yw = x / scale[:, None], s / scale
        coef = _nonnegative_lstsq(xw, yw) if nonnegative else np.linalg.lstsq(xw, yw, rcond=None)[0]
        fitted = x @ coef
        if np.any(fitted <= 0):
            break
        scale = fitted
    return float(coef[0]), float(coef[1])


def _nonnegative_lstsq(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """argmin ‖x c − y‖² over c ≥ 0 for two columns: the free solution if feasible, else the
    better of the two one-column solutions (clipped at 0)."""
    free, *_ = np.linalg.lstsq(x, y, rcond=None)
    if np.all(free >= 0):
        return free
    best, best_rss = np.zeros(2), float(y @ y)
    for k in range(2):
        c = max(float(x[:, k] @ y) / float(x[:, k] @ x[:, k]), 0.0)
        candidate = np.zeros(2)
        candidate[k] = c
        rss = float(np.sum((x @ candidate - y) ** 2))
        if rss < best_rss:
            best, best_rss = candidate, rss
    return best


def _groups(b: np.ndarray) -> list[np.ndarray]:
    """Indices of the points of each distinct batch size (up to rounding of E/S)."""
    keys = np.round(np.log2(b), 6)
    return [np.flatnonzero(keys == k) for k in np.unique(keys)]


def _bootstrap(s, b, groups, confidence, n_boot, rng_seed) -> tuple[float, float]:
    """Interval of B_crit from resamples of the points within each batch size.

    The refits are unconstrained and the percentiles taken of κ = 1/B_crit = S_min/E_min,
    which passes smoothly through 0 (no curvature) to negative values (noise), where B_crit
    itself would jump to infinity. The interval [1/κ_high, 1/κ_low] is unbounded above when
    κ_low ≤ 0. Its lower end uses max(κ_high, (κ_high − κ_low)/2): when the whole κ interval
    lies below 0, the data are at least as far from curvature as its half-width says.
    """
    rng = np.random.default_rng(rng_seed)
    kappa = np.empty(n_boot)
    for r in range(n_boot):
        idx = np.concatenate([g[rng.integers(0, len(g), len(g))] for g in groups])
        s_min, e_min = _fit(s[idx], b[idx], nonnegative=False)
        kappa[r] = s_min / e_min if e_min > 0 else math.inf
    alpha = (1 - confidence) / 2
    low = float(np.quantile(kappa, alpha, method="lower"))
    high = float(np.quantile(kappa, 1 - alpha, method="higher"))
    high = max(high, (high - low) / 2)
    return 1.0 / high if high > 0 else math.inf, 1.0 / low if low > 0 else math.inf


def _ratio(e_min: float, s_min: float) -> float:
    return e_min / s_min if s_min > 0 else math.inf
