"""The simple noise scale B_simple = tr Σ / |G|², smoothed over batches, with a confidence interval.

Per-batch estimates tr Σ̂_b and |G|²̂_b (:mod:`pergrad.stats.batch`) are unbiased but noisy;
|G|²̂_b is often negative when noise dominates. B_simple is therefore estimated as the ratio of
the two smoothed means, never as the mean of per-batch ratios: E[T/G] ≠ E[T]/E[G], and a
per-batch ratio explodes whenever |G|²̂_b is near zero.

Smoothing: batch b of t gets weight w_b = β^(t−b). The weighted mean Σ w_b x_b / Σ w_b is
exactly Adam's bias-corrected EMA m_t/(1−βᵗ) with m_t = β m_{t−1} + (1−β) x_t; β = 1 is the
plain average. The state keeps the weighted sums of the estimates, of their squares and of their
product, all in float64, so states of data-parallel workers merge by adding them (one
``all_reduce``).

Confidence interval: treating the batches as independent draws at a fixed θ, the smoothed means
T̄, Ḡ have variances and covariance v = (weighted mean of products − product of means) / (n_eff − 1),
e.g. v_TT = (Σ w T² / Σ w − T̄²) / (n_eff − 1), where n_eff = (Σ w_b)² / Σ w_b² is Kish's
effective number of batches. Fieller's interval for the ratio
R = T/G is the set of R with (T̄ − R Ḡ)² ≤ z² (v_TT − 2R v_TG + R² v_GG), z the normal quantile.
Unlike the delta method it stays honest when Ḡ is not clearly positive: the interval is then
unbounded above (B_simple may be infinite), which is how one sees that the estimate is still
noise. Intervals are clipped to [0, ∞]. Drift of θ over the smoothing window is not accounted
for.

References:
    McCandlish et al. 2018, "An Empirical Model of Large-Batch Training", arXiv:1812.06162
    (B_simple; the ratio of separately smoothed numerator and denominator).
    Kingma and Ba 2015, "Adam", arXiv:1412.6980 (the 1−βᵗ bias correction).
    Fieller 1954, "Some problems in interval estimation", J. R. Stat. Soc. B 16(2):175-185.
    Kish 1965, "Survey Sampling" (effective sample size).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from statistics import NormalDist
from typing import NamedTuple

import torch
from torch import Tensor

from ..per_example import PerExampleResult
from .batch import BatchEstimate, StatsWarning, _estimates
from .smoothing import check_beta

__all__ = ["NoiseEstimate", "NoiseScale", "NoiseState", "b_simple_ratio"]


class NoiseEstimate(NamedTuple):
    """Smoothed estimates: floats from :class:`NoiseScale`, (k,) tensors from :meth:`NoiseState.finalize`.

    NaN where no batch has been seen.

    Attributes:
        trace_sigma: smoothed tr Σ̂.
        grad_sq_norm: smoothed |G|²̂ (may be ≤ 0: noise dominates).
        b_simple: max(tr Σ̂, 0) / |G|²̂, or inf when |G|²̂ ≤ 0.
        lower, upper: Fieller confidence interval of B_simple, within [0, inf]; (0, inf) with
            fewer than two effective batches.
        effective_batches: Kish's n_eff = (Σ w_b)² / Σ w_b².
    """

    trace_sigma: float | Tensor
    grad_sq_norm: float | Tensor
    b_simple: float | Tensor
    lower: float | Tensor
    upper: float | Tensor
    effective_batches: float | Tensor


class NoiseState(NamedTuple):
    """Decayed float64 sums over batches b of estimates T_b = tr Σ̂_b and G_b = |G|²̂_b.

    Every field has shape (k,): k independent coordinates (the total and each parameter, or
    replicate streams). With weights w_b = β^(t−b):

    Attributes:
        weight: Σ w_b.
        weight_sq: Σ w_b².
        trace: Σ w_b T_b.
        grad_sq: Σ w_b G_b.
        trace_sq: Σ w_b T_b².
        grad_sq_sq: Σ w_b G_b².
        cross: Σ w_b T_b G_b.

    Merging workers is a sum of states: ``NoiseState(*all_reduce(torch.stack(state)))``.
    """

    weight: Tensor
    weight_sq: Tensor
    trace: Tensor
    grad_sq: Tensor
    trace_sq: Tensor
    grad_sq_sq: Tensor
    cross: Tensor

    @classmethod
    def init(cls, size: int) -> NoiseState:
        """A state of ``size`` coordinates that has seen no batch."""
        zeros = torch.zeros(size, dtype=torch.float64)
        return cls(*(zeros for _ in cls._fields))

    def update(self, estimate: BatchEstimate, beta: float) -> NoiseState:
        """Decay the sums by β and add one batch's estimates, each of shape (k,).

        Raises:
            ValueError: β outside (0, 1], shapes differ from the state's, or an estimate is not
                finite.
        """
        check_beta(beta)
        t = torch.as_tensor(estimate.trace_sigma, dtype=torch.float64)
        g = torch.as_tensor(estimate.grad_sq_norm, dtype=torch.float64)
        if t.shape != self.weight.shape or g.shape != self.weight.shape:
            raise ValueError(
                f"estimates of shape {tuple(t.shape)} and {tuple(g.shape)} do not match this state's "
                f"{tuple(self.weight.shape)} coordinates."
            )
        if not (torch.isfinite(t).all() and torch.isfinite(g).all()):
            raise ValueError("estimates must be finite: a NaN or inf would poison every later value.")
        b = beta
        return NoiseState(
            weight=b * self.weight + 1.0,
            weight_sq=b * b * self.weight_sq + 1.0,
            trace=b * self.trace + t,
            grad_sq=b * self.grad_sq + g,
            trace_sq=b * self.trace_sq + t * t,
            grad_sq_sq=b * self.grad_sq_sq + g * g,
            cross=b * self.cross + t * g,
        )

    def merge(self, other: NoiseState) -> NoiseState:
        """The state of both streams together (workers at the same steps, or consecutive runs
        with β = 1)."""
        if other.weight.shape != self.weight.shape:
            raise ValueError(
                f"cannot merge states of {tuple(self.weight.shape)} and {tuple(other.weight.shape)} coordinates."
            )
        return NoiseState(*(a + b for a, b in zip(self, other, strict=True)))

    def finalize(self, level: float = 0.95) -> NoiseEstimate:
        """Smoothed means, B_simple and its Fieller interval at confidence ``level``, per coordinate."""
        if not 0.0 < level < 1.0:
            raise ValueError(f"level must lie in (0, 1), got {level}.")
        seen = self.weight > 0
        w = torch.where(seen, self.weight, 1.0)
        t_mean, g_mean = self.trace / w, self.grad_sq / w
        ess = self.weight.square() / torch.where(seen, self.weight_sq, 1.0)
        several = ess > 1.0 + 1e-9
        dof = torch.where(several, ess - 1.0, 1.0)
        v_tt = (self.trace_sq / w - t_mean.square()) / dof
        v_gg = (self.grad_sq_sq / w - g_mean.square()) / dof
        v_tg = (self.cross / w - t_mean * g_mean) / dof

        inf = torch.full_like(t_mean, math.inf)
        b_simple = b_simple_ratio(t_mean, g_mean)

        # Fieller: a R² − 2 b R + c ≤ 0
        z2 = NormalDist().inv_cdf(0.5 + level / 2) ** 2
        a = g_mean.square() - z2 * v_gg
        b = t_mean * g_mean - z2 * v_tg
        c = t_mean.square() - z2 * v_tt
        disc = b.square() - a * c
        root = disc.clamp(min=0).sqrt()
        a_safe = torch.where(a != 0, a, 1.0)
        bounded = several & (g_mean > 0) & (a > 0)
        # a > 0: the interval between the roots; a < 0: everything outside them (or all R)
        left, right = (b - root) / a_safe, (b + root) / a_safe
        outside_low, outside_high = right, left  # for a < 0 the roots swap order
        unbounded_lower = torch.where(
            several & (a < 0) & (disc > 0) & (outside_low < 0), outside_high.clamp(min=0), 0.0
        )
        lower = torch.where(bounded, left.clamp(min=0), unbounded_lower)
        upper = torch.where(bounded, right.clamp(min=0), inf)

        nan = torch.full_like(t_mean, math.nan)
        fields = (t_mean, g_mean, b_simple, lower, upper, ess)
        return NoiseEstimate(*(torch.where(seen, f, nan) for f in fields))


class NoiseScale:
    """Smoothed tr Σ, |G|² and B_simple = tr Σ / |G|² over training steps, with an interval.

    B_simple is McCandlish et al.'s (2018) proxy for the critical batch size: well below it,
    doubling the batch nearly halves the steps needed; well above it, returns diminish.

    Args:
        beta: smoothing factor in (0, 1]; the estimates are Adam-style bias-corrected EMAs
            (β = 1: plain averages over all batches).
        population_size: N, for the finite-population correction when batches are drawn
            without replacement from N examples (see :mod:`pergrad.stats.batch`); None for none.
        preconditioner: None for B_simple; or a callable returning the optimizer's current
            diagonal P, {parameter name: tensor shaped like the parameter} (names as in
            ``model.named_parameters()``), read at every :meth:`update`: then ``b_simple``,
            :meth:`interval` and :meth:`estimate` are those of B_P = tr(PΣ) / GᵀPG, and the
            results need second moments (``PerExample(model, second_moment=True)``). It may
            return None (an optimizer before its first step): that batch is skipped.
            :func:`~pergrad.stats.adam_preconditioner` builds one for Adam and AdamW.

    Example:
        >>> noise = NoiseScale(beta=0.99)
        >>> for x, y in loader:                                  # doctest: +SKIP
        ...     result = pe.backward(loss_fn(model(x), y), reduction="mean")
        ...     noise.update(result)
        >>> noise.b_simple, noise.interval(0.95), noise.b_simple_note  # doctest: +SKIP
        >>> b_p = NoiseScale(0.99, preconditioner=adam_preconditioner(optimizer, model))  # doctest: +SKIP

    References:
        McCandlish et al. 2018, "An Empirical Model of Large-Batch Training", arXiv:1812.06162
        (appendix: preconditioned optimizers).
    """

    def __init__(
        self,
        beta: float = 0.99,
        *,
        population_size: int | None = None,
        preconditioner: Callable[[], Mapping[str, Tensor] | None] | None = None,
    ):
        check_beta(beta)
        self.beta = beta
        self.population_size = population_size
        self.preconditioner = preconditioner
        self.names: tuple[str, ...] | None = None
        self.state: NoiseState | None = None

    def update(self, result: PerExampleResult) -> None:
        """Add one batch's per-example estimates (in total and per parameter); with a
        preconditioner, those of tr(PΣ) and GᵀPG at its current P.

        A batch of one example carries no variance: it is skipped with a :class:`StatsWarning`.
        """
        if result.n < 2:
            warnings.warn(
                "NoiseScale skipped a batch of n=1 example: one example has no variance, so it "
                "says nothing about tr Σ. Use batches of at least 2 examples.",
                StatsWarning,
                stacklevel=2,
            )
            return
        weights = None
        if self.preconditioner is not None:
            weights = self.preconditioner()
            if weights is None:  # no P yet (an optimizer before its first step)
                return
        self._add(tuple(result.param_sq_norms), _estimates(result, self.population_size, weights))

    def update_estimate(self, estimate: BatchEstimate, names: tuple[str, ...] = ()) -> None:
        """Add one batch's estimates from elsewhere, e.g. :func:`two_batch_estimate`, or a merged
        step's ``step.estimate(preconditioner=noise.preconditioner())`` (as they are: the
        preconditioner is not applied here).

        Args:
            estimate: floats for the total alone (``names`` empty), or (1+P,) float64 tensors:
                the total, then each of the P ``names`` (as merged data-parallel workers give,
                see :class:`pergrad.distributed.StepResult`).
            names: the parameter names of coordinates 1…P.
        """
        t = torch.as_tensor(estimate.trace_sigma, dtype=torch.float64).reshape(-1)
        g = torch.as_tensor(estimate.grad_sq_norm, dtype=torch.float64).reshape(-1)
        if t.shape != (1 + len(names),) or g.shape != t.shape:
            raise ValueError(
                f"the estimate has {t.numel()} and {g.numel()} values for {len(names)} names: give "
                "1 + len(names) values each (the total, then each parameter)."
            )
        self._add(tuple(names), BatchEstimate(t, g))

    def merge(self, other: NoiseScale) -> None:
        """Add another worker's state to this one (same β, same parameters)."""
        if other.beta != self.beta or other.population_size != self.population_size:
            raise ValueError(
                f"cannot merge NoiseScale(beta={other.beta}, population_size={other.population_size}) "
                f"into NoiseScale(beta={self.beta}, population_size={self.population_size})."
            )
        if (other.preconditioner is None) != (self.preconditioner is None):
            raise ValueError("cannot merge a preconditioned NoiseScale (B_P) with a plain one (B_simple).")
        if other.state is None:
            return
        if self.state is None:
            self.names, self.state = other.names, other.state
            return
        self._check_names(other.names)
        self.state = self.state.merge(other.state)

    def state_dict(self) -> dict:
        """The smoothing settings, parameter names and sums, for a checkpoint."""
        return {
            "beta": self.beta,
            "population_size": self.population_size,
            "names": None if self.names is None else list(self.names),
            "state": None if self.state is None else torch.stack(tuple(self.state)),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`; refuses different settings."""
        _check_settings("NoiseScale", self.beta, self.population_size, state)
        self.names = None if state["names"] is None else tuple(state["names"])
        self.state = None if state["state"] is None else NoiseState(*state["state"].to(torch.float64))

    def estimate(self, level: float = 0.95) -> NoiseEstimate:
        """Everything over all parameters, as floats."""
        return self._finalize(level)[0]

    def param_estimates(self, level: float = 0.95) -> dict[str, NoiseEstimate]:
        """{parameter name: NoiseEstimate}: the per-layer noise scale, from ``update(result)``."""
        estimates = self._finalize(level)
        return dict(zip(self.names or (), estimates[1:], strict=True))

    @property
    def trace_sigma(self) -> float:
        """Smoothed tr Σ̂ (NaN before the first batch)."""
        return self.estimate().trace_sigma

    @property
    def grad_sq_norm(self) -> float:
        """Smoothed |G|²̂ (NaN before the first batch; ≤ 0 while noise dominates)."""
        return self.estimate().grad_sq_norm

    @property
    def b_simple(self) -> float:
        """trace_sigma / grad_sq_norm; inf when grad_sq_norm ≤ 0 (see :attr:`b_simple_note`)."""
        return self.estimate().b_simple

    @property
    def effective_batches(self) -> float:
        """Kish's effective number of batches behind the smoothed estimates."""
        return self.estimate().effective_batches

    def interval(self, level: float = 0.95) -> tuple[float, float]:
        """Fieller confidence interval of B_simple; unbounded above while |G|² is not clearly > 0."""
        e = self.estimate(level)
        return e.lower, e.upper

    @property
    def b_simple_note(self) -> str | None:
        """Why B_simple is NaN, inf or 0, or None when it is an ordinary number."""
        if self.state is None:
            return "no batch seen yet: B_simple is NaN until the first update."
        e = self.estimate()
        if e.grad_sq_norm <= 0:
            return (
                f"the |G|² estimate is {e.grad_sq_norm:.3g} <= 0 (tr Σ estimate {e.trace_sigma:.3g}): "
                "gradient noise dominates the signal at the batch sizes seen, so B_simple is "
                "unbounded (inf). Average over more batches (beta closer to 1) or use larger batches."
            )
        if e.trace_sigma <= 0:
            return (
                f"the tr Σ estimate is {e.trace_sigma:.3g} <= 0: the noise is below what these "
                "batches resolve, so B_simple is reported as 0."
            )
        return None

    def _add(self, names: tuple[str, ...], estimate: BatchEstimate) -> None:
        if self.state is None:
            self.names, self.state = names, NoiseState.init(1 + len(names))
        self._check_names(names)
        self.state = self.state.update(estimate, self.beta)

    def _check_names(self, names: tuple[str, ...] | None) -> None:
        if names != self.names:
            raise ValueError(
                f"this NoiseScale tracks parameters {list(self.names or ())} but was given "
                f"{list(names or ())}: use one NoiseScale per model, and a separate one for "
                "update_estimate (totals only)."
            )

    def _finalize(self, level: float) -> list[NoiseEstimate]:
        """One NoiseEstimate of floats per coordinate: the total, then each parameter."""
        state = self.state if self.state is not None else NoiseState.init(1)
        est = state.finalize(level)
        return [NoiseEstimate(*(float(f[i]) for f in est)) for i in range(est.trace_sigma.shape[0])]


def b_simple_ratio(trace_sigma: Tensor | float, grad_sq_norm: Tensor | float) -> Tensor:
    """B_simple = max(tr Σ, 0) / |G|², elementwise: a negative noise estimate counts as 0, and
    the ratio is inf where |G|² ≤ 0 (noise dominates the signal).

    Args:
        trace_sigma: a float or float64 tensor.
        grad_sq_norm: a float or float64 tensor of the same shape.

    Returns:
        A float64 tensor of that shape.

    References:
        McCandlish et al. 2018, arXiv:1812.06162, eq. 2.8.
    """
    t = torch.as_tensor(trace_sigma, dtype=torch.float64)
    g = torch.as_tensor(grad_sq_norm, dtype=torch.float64)
    positive = g > 0
    return torch.where(positive, t.clamp(min=0) / torch.where(positive, g, 1.0), math.inf)


def _check_settings(kind: str, beta: float, population_size: int | None, state: dict) -> None:
    if state["beta"] != beta or state["population_size"] != population_size:
        raise ValueError(
            f"the saved {kind} has beta={state['beta']}, population_size={state['population_size']} but this "
            f"one has beta={beta}, population_size={population_size}: create it with the saved settings."
        )
