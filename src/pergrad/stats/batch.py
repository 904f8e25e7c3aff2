"""Unbiased estimates of the gradient noise tr Σ and the true squared gradient |G|² from one batch.

Notation: gⱼ = ∇θ ℓⱼ is the gradient of example j's own loss, G = E[gⱼ] the true gradient and
Σ = Cov[gⱼ] the per-example covariance. A batch of B examples has mean gradient
ḡ_B = (1/B) Σⱼ gⱼ and, drawn with replacement (or from an infinite stream),

    E‖ḡ_B‖² = |G|² + c_B · tr Σ,    c_B = 1/B.

Two batch sizes B_small < B_big give two such equations, solved for the two unknowns:

    tr Σ̂ = (‖ḡ_small‖² − ‖ḡ_big‖²) / (c_small − c_big),   |G|²̂ = ‖ḡ_big‖² − c_big · tr Σ̂,

both unbiased because they are linear in unbiased quantities. This is the two-batch estimator of
McCandlish et al. (2018). Per-example squared norms sⱼ = ‖gⱼ‖² are the case B_small = 1
(‖ḡ_small‖² is replaced by mean sⱼ), which gives

    tr Σ̂ = n/(n−1) · (mean sⱼ − ‖ḡ‖²),   |G|²̂ = ‖ḡ‖² − tr Σ̂ / n.

A diagonal weight P ≥ 0 (a preconditioner: Adam's 1/(√v̂ + ε)) turns every squared norm into
‖x‖²_P = Σ_k P_k x_k², and the same two lines, fed ‖·‖²_P, give tr(PΣ)̂ and GᵀPĜ: E‖ḡ_B‖²_P =
GᵀPG + c_B tr(PΣ) holds for any fixed P. The per-example mean is read from the second moments,
mean ‖gⱼ‖²_P = (1/n) Σ_k P_k Σⱼ g_jk² (:func:`weighted_sq_norms`), so it needs
``PerExample(..., second_moment=True)`` and no other backward.

Finite-population correction (opt-in, ``population_size=N``): when each batch is drawn *without*
replacement from a data set of N examples (a shuffled epoch), G is the mean of the N gradients,
Σ their covariance with divisor N, and E‖ḡ_B‖² = |G|² + tr Σ/B · (N−B)/(N−1), so
c_B = (N−B) / (B(N−1)). The estimators keep the same form and are exactly unbiased over all
subsets; at B = N they return tr Σ and |G|² of the data set exactly. Used on batches drawn with
replacement they would be biased: leave it off unless batches are drawn without replacement.

References:
    McCandlish, Kaplan, Amodei and the OpenAI Dota Team, "An Empirical Model of Large-Batch
    Training", 2018, arXiv:1812.06162 (appendix A: the unbiased estimators).
    Cochran, "Sampling Techniques", 3rd ed., 1977 (the finite-population correction).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor

from ..per_example import PerExampleResult

__all__ = [
    "BatchEstimate",
    "StatsWarning",
    "batch_estimate",
    "mean_grad_sq_norm",
    "noise_coefficient",
    "param_batch_estimates",
    "per_example_estimate",
    "two_batch_estimate",
    "weighted_sq_norms",
]


class StatsWarning(UserWarning):
    """A statistic cannot be estimated from the data given (one example has no variance...)."""


class BatchEstimate(NamedTuple):
    """Unbiased estimates from one batch (floats, or float64 tensors computed elementwise).

    Attributes:
        trace_sigma: tr Σ̂, the summed variance of one example's gradient. Never negative from
            per-example norms; can be from the two-batch estimator (noise).
        grad_sq_norm: |G|²̂, the squared norm of the true gradient. Negative when noise dominates.
    """

    trace_sigma: float | Tensor
    grad_sq_norm: float | Tensor


def noise_coefficient(batch_size, population_size: int | None = None):
    """c_B in E‖ḡ_B‖² = |G|² + c_B tr Σ: 1/B, or (N−B)/(B(N−1)) for batches drawn without
    replacement from N examples. Elementwise for an array or tensor of batch sizes.

    References:
        Cochran, "Sampling Techniques", 3rd ed., 1977 (the finite-population correction).
    """
    if population_size is None:
        return 1.0 / batch_size
    return (population_size - batch_size) / (batch_size * (population_size - 1))


def two_batch_estimate(
    small_sq_norm: float | Tensor,
    big_sq_norm: float | Tensor,
    small_size: float,
    big_size: int,
    population_size: int | None = None,
) -> BatchEstimate:
    """tr Σ̂ and |G|²̂ from the squared norms of mean gradients at two batch sizes.

    For when only batch gradients are known: gradient accumulation (micro-batches inside a
    step) or data-parallel workers (each worker's batch inside the global batch). With
    ``small_size=1`` and ``small_sq_norm`` the mean per-example squared norm, it is exactly the
    per-example estimator of :func:`batch_estimate`. Works elementwise on float64 tensors.

    Args:
        small_sq_norm: ‖ḡ_small‖², the squared norm of the *mean* gradient over B_small examples
            (divide a summed gradient's squared norm by B_small²); better, the average of this
            over the micro-batches or workers of one step, which is just as unbiased and less
            noisy.
        big_sq_norm: ‖ḡ_big‖², the same over B_big examples (the whole step).
        small_size: B_small ≥ 1. For small batches of unequal sizes b₁…b_M, their harmonic
            mean M / Σₘ 1/bₘ (a float): E[mean ‖ḡ_m‖²] = |G|² + tr Σ · mean 1/bₘ, so the
            estimates stay unbiased (also with the finite-population correction, linear in 1/B).
        big_size: B_big > B_small.
        population_size: N, to correct for batches drawn without replacement from N examples
            (see the module docstring); None (default) for sampling with replacement or an
            unbounded stream.

    Returns:
        A :class:`BatchEstimate`:
        tr Σ̂ = (‖ḡ_small‖² − ‖ḡ_big‖²) / (1/B_small − 1/B_big) and
        |G|²̂ = (B_big ‖ḡ_big‖² − B_small ‖ḡ_small‖²) / (B_big − B_small) (without correction).

    Raises:
        ValueError: sizes not 1 ≤ B_small < B_big (≤ N).

    References:
        McCandlish et al. 2018, "An Empirical Model of Large-Batch Training", arXiv:1812.06162,
        appendix A.
    """
    if not 1 <= small_size < big_size:
        raise ValueError(
            f"the two batch sizes must satisfy 1 <= small_size < big_size, got {small_size} and "
            f"{big_size}: two different batch sizes are needed to separate noise from signal."
        )
    if population_size is not None and big_size > population_size:
        raise ValueError(
            f"population_size={population_size} is smaller than the batch size {big_size}: a batch "
            "drawn without replacement cannot hold more examples than the data set."
        )
    c_small = noise_coefficient(small_size, population_size)
    c_big = noise_coefficient(big_size, population_size)
    trace_sigma = (small_sq_norm - big_sq_norm) / (c_small - c_big)
    return BatchEstimate(trace_sigma, big_sq_norm - c_big * trace_sigma)


def mean_grad_sq_norm(result: PerExampleResult) -> float:
    """‖ḡ‖², the squared norm of the mean per-example gradient, whatever the reduction.

    ``result.batch_grad_sq_norm`` is ‖∇L‖² of the reduced loss: ‖ḡ‖² for ``reduction="mean"``,
    n²‖ḡ‖² for ``"sum"``.
    """
    return float(_batch_sq_norms(result)[0])


def batch_estimate(result: PerExampleResult, population_size: int | None = None) -> BatchEstimate:
    """tr Σ̂ and |G|²̂ over all parameters from one :class:`~pergrad.PerExampleResult`.

    Args:
        result: from ``PerExample.backward``; either reduction gives the same estimates.
        population_size: N for the finite-population correction (batches drawn without
            replacement from N examples); None for none.

    Returns:
        A :class:`BatchEstimate` of floats; NaN, with a :class:`StatsWarning`, for n = 1.

    References:
        McCandlish et al. 2018, arXiv:1812.06162, appendix A.
    """
    return _pick(_estimates(result, population_size), 0)


def param_batch_estimates(result: PerExampleResult, population_size: int | None = None) -> dict[str, BatchEstimate]:
    """:func:`batch_estimate` for each parameter: {name: BatchEstimate}, summing to the total."""
    estimates = _estimates(result, population_size)
    return {name: _pick(estimates, i + 1) for i, name in enumerate(result.param_sq_norms)}


def _pick(estimates: BatchEstimate, i: int) -> BatchEstimate:
    return BatchEstimate(float(estimates.trace_sigma[i]), float(estimates.grad_sq_norm[i]))


def _estimates(
    result: PerExampleResult, population_size: int | None, weights: Mapping[str, Tensor] | None = None
) -> BatchEstimate:
    """(1+P,) float64 estimates: index 0 over all parameters, then each parameter in order;
    with ``weights`` ({name: p.shape} diagonal P), those of tr(PΣ) and GᵀPG."""
    if weights is None:
        return per_example_estimate(_mean_sq_norms(result), _batch_sq_norms(result), result.n, population_size)
    if result.second_moment is None:
        raise ValueError(
            "a preconditioned noise scale needs the per-example second moments: create the engine with "
            "PerExample(model, second_moment=True)."
        )
    scale = 1.0 if result.reduction == "mean" else 1.0 / result.n
    mean_grads = {name: g * scale for name, g in result.batch_grads.items()}
    mean_sq, batch_sq = weighted_sq_norms(result.second_moment, mean_grads, result.n, weights)
    return per_example_estimate(mean_sq, batch_sq, result.n, population_size)


def weighted_sq_norms(
    second_moment: Mapping[str, Tensor], mean_grads: Mapping[str, Tensor], n: int, weights: Mapping[str, Tensor]
) -> tuple[Tensor, Tensor]:
    """The squared norms that :func:`per_example_estimate` reads, in the metric of a diagonal P.

    Args:
        second_moment: {name: p.shape} Σⱼ gⱼ² over the n examples (each example's own gradient).
        mean_grads: {name: p.shape} ḡ = (1/n) Σⱼ gⱼ.
        n: examples.
        weights: {name: p.shape} the diagonal P ≥ 0, for every name of ``second_moment``.

    Returns:
        (1+P,) float64 mean ‖gⱼ‖²_P = (1/n) Σ_k P_k Σⱼ g_jk², and (1+P,) float64 ‖ḡ‖²_P =
        Σ_k P_k ḡ_k²: in total, then per parameter in ``second_moment``'s order. With P = 1 they
        are mean ‖gⱼ‖² and ‖ḡ‖².

    Raises:
        ValueError: a parameter without a weight, or a weight of another shape.
    """
    mean_sq, batch_sq = [], []
    for name, m in second_moment.items():
        w = weights.get(name)
        if w is None or tuple(w.shape) != tuple(m.shape):
            got = "none" if w is None else f"shape {tuple(w.shape)}"
            raise ValueError(
                f"the preconditioner gives parameter {name!r} {got}, but it has shape {tuple(m.shape)}: return "
                "{name: tensor shaped like the parameter} for every trainable parameter (names as in "
                "model.named_parameters())."
            )
        w = _as_float64(w)
        mean_sq.append((w * _as_float64(m)).sum() / n)
        batch_sq.append((w * _as_float64(mean_grads[name]).square()).sum())
    zero = torch.zeros(1, dtype=torch.float64)
    mean_sq_t, batch_sq_t = (torch.stack(v) if v else zero[:0] for v in (mean_sq, batch_sq))
    return torch.cat([mean_sq_t.sum().reshape(1), mean_sq_t]), torch.cat([batch_sq_t.sum().reshape(1), batch_sq_t])


def per_example_estimate(
    mean_sq_norms: Tensor, batch_sq_norms: Tensor, n: int, population_size: int | None = None
) -> BatchEstimate:
    """tr Σ̂ = n/(n−1) · (mean sⱼ − ‖ḡ‖²) and |G|²̂ = ‖ḡ‖² − tr Σ̂ / n (with the optional
    finite-population correction): :func:`two_batch_estimate` with the small batch of size 1.

    Args:
        mean_sq_norms: (k,) float64 mean over the n examples of sⱼ = ‖gⱼ‖².
        batch_sq_norms: (k,) float64 ‖ḡ‖² of their mean gradient.
        n: examples in the batch.
        population_size: N, for batches drawn without replacement from N examples; None for none.

    Returns:
        A :class:`BatchEstimate` of (k,) tensors; NaN, with a :class:`StatsWarning`, for n < 2.
    """
    if n < 2:
        warnings.warn(
            f"a batch of n={n} example has no variance: tr Σ and |G|² cannot be separated, so the "
            "estimates are NaN. Use batches of at least 2 examples.",
            StatsWarning,
            stacklevel=4,
        )
        nan = torch.full_like(mean_sq_norms, math.nan)
        return BatchEstimate(nan, nan.clone())
    return two_batch_estimate(mean_sq_norms, batch_sq_norms, 1, n, population_size)


def _as_float64(t: Tensor) -> Tensor:
    return t.detach().to(device="cpu", dtype=torch.float64)


def _mean_sq_norms(result: PerExampleResult) -> Tensor:
    """(1+P,) mean over examples of ‖gⱼ‖², in total then per parameter."""
    per_example = [result.sq_norms, *result.param_sq_norms.values()]
    return torch.stack([_as_float64(s).mean() for s in per_example])


def _batch_sq_norms(result: PerExampleResult) -> Tensor:
    """(1+P,) ‖ḡ‖² of the mean gradient, in total then per parameter."""
    reduced = [result.batch_grad_sq_norm, *result.param_batch_grad_sq_norms.values()]
    scale = 1.0 if result.reduction == "mean" else float(result.n) ** 2
    return torch.stack([_as_float64(r) for r in reduced]) / scale
