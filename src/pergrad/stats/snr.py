"""Gradient signal-to-noise ratio per parameter element, from per-example second moments.

Definition. For element j of a parameter, with per-example gradients gⱼ (one coordinate of
∇ℓ), the true gradient G_j = E[gⱼ] and the per-example variance Σ_jj = Var[gⱼ]:

    SNR_j = G_j² / Σ_jj.

SNR_j > 1 means one example's gradient already points the right way in that coordinate; a batch
of B examples has SNR B·SNR_j. Per parameter (layer), the elements are aggregated as a ratio of
sums, never a mean of ratios:

    SNR_p = Σ_j G_j² / Σ_j Σ_jj = |G_p|² / tr Σ_p = 1 / B_simple,p,

the inverse of that parameter's noise scale (:meth:`NoiseScale.param_estimates`), which it
matches exactly; the elementwise values show which coordinates carry signal.

Estimation. In one batch of n, with ḡ_j the batch-mean gradient and q_j = (1/n) Σᵢ gᵢⱼ² (the
engine's ``second_moment`` / n), the unbiased per-batch estimates are those of
:func:`~pergrad.stats.batch.two_batch_estimate` applied to each element:
Σ̂_jj = n/(n−1) (q_j − ḡ_j²) and Ĝ_j² = ḡ_j² − Σ̂_jj/n. Both are smoothed over batches with
weights β^(t−b), as for the noise scale, and the SNR is the ratio of the smoothed sums (the
bias corrections cancel). The per-batch second moments come in the model's dtype: for elements
whose SNR exceeds ~1/eps of that dtype the noise estimate is rounding.

References:
    Liu et al. 2020, "Understanding Why Neural Networks Generalize Well Through GSNR of
    Parameters", ICLR, arXiv:2001.07384 (elementwise gradient SNR).
    McCandlish et al. 2018, arXiv:1812.06162 (SNR_p = 1/B_simple).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor

from ..per_example import PerExampleResult
from .batch import StatsWarning, two_batch_estimate
from .noise_scale import _check_settings
from .smoothing import check_beta

__all__ = ["ParamSNR", "SNREstimate", "SNRState"]


class SNREstimate(NamedTuple):
    """The signal-to-noise ratio of one parameter.

    Attributes:
        snr: |G_p|² / tr Σ_p from the smoothed sums, with |G_p|² clipped at 0 (noise dominates);
            inf when the parameter's gradient has no noise but a signal, NaN when it has neither.
        elementwise: (p.shape) float64 SNR_j, with the same clipping and conventions.
    """

    snr: float
    elementwise: Tensor


class SNRState(NamedTuple):
    """Decayed float64 sums over batches, per parameter element.

    Attributes:
        signal: {name: p.shape} Σ_b β^(t−b) Ĝ_j²(b).
        noise: {name: p.shape} Σ_b β^(t−b) Σ̂_jj(b).

    Merging workers is a sum of states (one ``all_reduce`` of the concatenated fields).
    """

    signal: dict[str, Tensor]
    noise: dict[str, Tensor]

    @classmethod
    def init(cls) -> SNRState:
        """A state that has seen no batch; parameters are taken from the first update."""
        return cls({}, {})

    def update(
        self,
        result: PerExampleResult,
        batch_grads: Mapping[str, Tensor],
        *,
        beta: float = 0.99,
        population_size: int | None = None,
    ) -> SNRState:
        """Decay the sums by β and add one batch.

        Args:
            result: from ``PerExample(model, second_moment=True).backward(...)``.
            batch_grads: {name: p.shape} the gradient of the reduced loss of this backward alone,
                ``{k: p.grad for k, p in model.named_parameters()}`` after a ``zero_grad()``. It is
                checked against ``result.param_batch_grad_sq_norms``.
            beta: smoothing factor in (0, 1].
            population_size: N, for the finite-population correction (batches drawn without
                replacement from N examples); None for none.

        Returns:
            The new state; the same state, with a :class:`StatsWarning`, for a batch of n = 1.

        Raises:
            ValueError: no second moments in ``result``; ``batch_grads`` missing a parameter or
                not matching this backward's gradient; parameters differ from earlier batches.
        """
        check_beta(beta)
        if result.second_moment is None:
            raise ValueError(
                "the result has no second moments: create the engine with PerExample(model, second_moment=True)."
            )
        n = result.n
        if n < 2:
            warnings.warn(
                "SNRState skipped a batch of n=1 example: one example has no variance. Use "
                "batches of at least 2 examples.",
                StatsWarning,
                stacklevel=2,
            )
            return self
        scale = 1.0 if result.reduction == "mean" else float(n)
        mean_grads = {
            name: _checked_batch_grad(batch_grads, name, second.shape, result.param_batch_grad_sq_norms[name]) / scale
            for name, second in result.second_moment.items()
        }
        return self.update_sums(result.second_moment, mean_grads, n, beta=beta, population_size=population_size)

    def update_sums(
        self,
        second_moment: Mapping[str, Tensor],
        mean_grads: Mapping[str, Tensor],
        n: int,
        *,
        beta: float = 0.99,
        population_size: int | None = None,
    ) -> SNRState:
        """Decay the sums by β and add one batch given by its sums, e.g. merged over workers.

        Args:
            second_moment: {name: p.shape} Σⱼ gⱼ² over the batch's n examples.
            mean_grads: {name: p.shape} ḡ = (1/n) Σⱼ gⱼ, the batch's mean gradient.
            n: the number of examples, ≥ 2.
            beta: as for :meth:`update`.
            population_size: as for :meth:`update`.

        Raises:
            ValueError: n < 2, or parameters differ from earlier batches.
        """
        check_beta(beta)
        if n < 2:
            raise ValueError(f"a batch of n={n} example has no variance: give batches of at least 2 examples.")
        if self.signal and set(self.signal) != set(second_moment):
            raise ValueError(
                f"this state tracks parameters {list(self.signal)} but the batch has {list(second_moment)}."
            )
        signal, noise = {}, {}
        for name, second in second_moment.items():
            mean = mean_grads[name].detach().to(torch.float64)
            sq_mean = second.detach().to(torch.float64) / n
            estimate = two_batch_estimate(sq_mean, mean.square(), 1, n, population_size)
            signal[name] = beta * self.signal.get(name, 0.0) + estimate.grad_sq_norm
            noise[name] = beta * self.noise.get(name, 0.0) + estimate.trace_sigma
        return SNRState(signal, noise)

    def merge(self, other: SNRState) -> SNRState:
        """The state of both workers' batches together."""
        if not self.signal or not other.signal:
            return self if self.signal else other
        if set(self.signal) != set(other.signal):
            raise ValueError(f"cannot merge states of parameters {list(self.signal)} and {list(other.signal)}.")
        return SNRState(
            {k: v + other.signal[k] for k, v in self.signal.items()},
            {k: v + other.noise[k] for k, v in self.noise.items()},
        )

    def finalize(self) -> dict[str, SNREstimate]:
        """{name: SNREstimate}; empty before the first batch."""
        return {
            name: SNREstimate(
                float(_ratio(signal.sum(), self.noise[name].sum())),
                _ratio(signal, self.noise[name]),
            )
            for name, signal in self.signal.items()
        }


class ParamSNR:
    """Smoothed gradient SNR per parameter over training steps: an :class:`SNRState` to update.

    Args:
        beta: smoothing factor in (0, 1] (β = 1: plain sums over all batches).
        population_size: N, for the finite-population correction; None for none.

    Example:
        >>> snr = ParamSNR(beta=0.99)
        >>> with PerExample(model, second_moment=True) as pe:     # doctest: +SKIP
        ...     model.zero_grad()
        ...     result = pe.backward(losses)
        ...     snr.update(result)
        >>> snr.layer_snr()                                        # doctest: +SKIP
        {'0.weight': 0.021, '0.bias': 0.18, ...}

    References:
        Liu et al. 2020, arXiv:2001.07384; McCandlish et al. 2018, arXiv:1812.06162.
    """

    def __init__(self, beta: float = 0.99, *, population_size: int | None = None):
        check_beta(beta)
        self.beta = beta
        self.population_size = population_size
        self.state = SNRState.init()

    def update(self, result: PerExampleResult, batch_grads: Mapping[str, Tensor] | None = None) -> None:
        """Add one batch; see :meth:`SNRState.update` for the arguments and errors.

        ``batch_grads`` defaults to ``result.batch_grads``, this backward's own gradient.
        """
        batch_grads = result.batch_grads if batch_grads is None else batch_grads
        self.state = self.state.update(result, batch_grads, beta=self.beta, population_size=self.population_size)

    def update_sums(self, second_moment: Mapping[str, Tensor], mean_grads: Mapping[str, Tensor], n: int) -> None:
        """Add one batch given by its sums; see :meth:`SNRState.update_sums`."""
        self.state = self.state.update_sums(
            second_moment, mean_grads, n, beta=self.beta, population_size=self.population_size
        )

    def merge(self, other: ParamSNR) -> None:
        """Add another worker's sums to this one (same β)."""
        if other.beta != self.beta or other.population_size != self.population_size:
            raise ValueError(f"cannot merge ParamSNR(beta={other.beta}) into ParamSNR(beta={self.beta}).")
        self.state = self.state.merge(other.state)

    def estimates(self) -> dict[str, SNREstimate]:
        """{name: SNREstimate}: the layer SNR and the elementwise SNR of each parameter."""
        return self.state.finalize()

    def layer_snr(self) -> dict[str, float]:
        """{name: |G_p|² / tr Σ_p}; empty before the first batch."""
        return {name: e.snr for name, e in self.estimates().items()}

    def state_dict(self) -> dict:
        """The smoothing settings and sums, for a checkpoint."""
        return {
            "beta": self.beta,
            "population_size": self.population_size,
            "signal": {k: v.clone() for k, v in self.state.signal.items()},
            "noise": {k: v.clone() for k, v in self.state.noise.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`; refuses different settings."""
        _check_settings("ParamSNR", self.beta, self.population_size, state)
        self.state = SNRState(dict(state["signal"]), dict(state["noise"]))


def _ratio(signal: Tensor, noise: Tensor) -> Tensor:
    """max(signal, 0) / noise; inf where noise ≤ 0 < signal, NaN where both ≤ 0."""
    positive = signal.clamp(min=0)
    has_noise = noise > 0
    ratio = positive / torch.where(has_noise, noise, 1.0)
    no_noise = torch.where(positive > 0, torch.full_like(positive, math.inf), torch.full_like(positive, math.nan))
    return torch.where(has_noise, ratio, no_noise)


def _checked_batch_grad(batch_grads: Mapping[str, Tensor], name: str, shape: torch.Size, sq_norm: Tensor) -> Tensor:
    if name not in batch_grads or batch_grads[name] is None:
        raise ValueError(
            f"batch_grads has no gradient for parameter '{name}': pass "
            "{k: p.grad for k, p in model.named_parameters()} right after the backward."
        )
    grad = batch_grads[name]
    if grad.shape != shape:
        raise ValueError(f"batch_grads['{name}'] has shape {tuple(grad.shape)}, expected {tuple(shape)}.")
    given, expected = float(grad.detach().double().square().sum()), float(sq_norm)
    if not math.isclose(given, expected, rel_tol=1e-4, abs_tol=1e-30):
        raise ValueError(
            f"batch_grads['{name}'] has squared norm {given:.6g} but this backward's gradient has "
            f"{expected:.6g}: was .grad accumulated over several backward passes? Call "
            "model.zero_grad() before PerExample.backward and pass .grad right after it."
        )
    return grad
