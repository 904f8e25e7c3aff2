"""Ground truth for the statistics: linear regression with Gaussian inputs.

x ~ N(0, H), y = xᵀw* + ε with ε ~ N(0, σ²), loss ℓ = ½(xᵀw − y)², δ = w − w*. The per-example
gradient is g = x (xᵀδ − ε), so (Isserlis) G = Hδ and Σ = (δᵀHδ + σ²) H + Hδ δᵀH:
|G|² = ‖Hδ‖², tr Σ = ‖Hδ‖² + (δᵀHδ + σ²) tr H, Σ_jj = (δᵀHδ + σ²) H_jj + (Hδ)_j².
Monte Carlo runs many batches at once in closed form; NoiseScale and the SNR run end to end
through PerExample on nn.Linear(d, 1, bias=False).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import pytest
import torch
from torch import Tensor, nn

import pergrad
from pergrad.stats import BatchEstimate, NoiseScale, NoiseState, ParamSNR, two_batch_estimate

D = torch.float64


class Problem(NamedTuple):
    H: Tensor  # (d, d)
    delta: Tensor  # (d,)
    sigma: float
    chol: Tensor  # (d, d) H = chol cholᵀ

    @property
    def grad_sq_norm(self) -> float:
        return float((self.H @ self.delta).square().sum())

    @property
    def trace_sigma(self) -> float:
        d, H = self.delta, self.H
        return self.grad_sq_norm + float(d @ H @ d + self.sigma**2) * float(torch.trace(H))

    @property
    def b_simple(self) -> float:
        return self.trace_sigma / self.grad_sq_norm

    @property
    def elementwise_snr(self) -> Tensor:
        d, H = self.delta, self.H
        signal = (H @ d).square()
        return signal / (float(d @ H @ d + self.sigma**2) * torch.diagonal(H) + signal)

    def sample(self, gen: torch.Generator, *shape: int) -> tuple[Tensor, Tensor]:
        """x (*shape, d) ~ N(0, H) and ε (*shape,) ~ N(0, σ²)."""
        x = torch.randn(*shape, self.H.shape[0], dtype=D, generator=gen) @ self.chol.T
        return x, self.sigma * torch.randn(*shape, dtype=D, generator=gen)

    def grads(self, gen: torch.Generator, *shape: int) -> Tensor:
        """(*shape, d) per-example gradients x (xᵀδ − ε)."""
        x, eps = self.sample(gen, *shape)
        return x * (x @ self.delta - eps)[..., None]


def problem() -> Problem:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4, 4, dtype=D, generator=gen)
    H = a @ a.T / 4 + 0.5 * torch.eye(4, dtype=D)
    delta = 0.25 * torch.tensor([1.0, -0.5, 0.3, 0.8], dtype=D)
    return Problem(H, delta, 0.7, torch.linalg.cholesky(H))  # B_simple ≈ 12.8


def per_example_estimates(g: Tensor) -> BatchEstimate:
    """Estimates from (R, n, d) per-example gradients of R batches: (R,) each."""
    n = g.shape[1]
    return two_batch_estimate(g.square().sum(-1).mean(-1), g.mean(1).square().sum(-1), 1, n)


def assert_within_3_se(samples: Tensor, truth: float) -> None:
    se = float(samples.std() / math.sqrt(samples.numel()))
    assert abs(float(samples.mean()) - truth) < 3 * se, (float(samples.mean()), truth, se)


def test_per_example_estimators_are_unbiased():
    p, gen = problem(), torch.Generator().manual_seed(1)
    n = 8  # small, where the n/(n−1) correction matters
    g = p.grads(gen, 20_000, n)
    est = per_example_estimates(g)
    assert_within_3_se(est.trace_sigma, p.trace_sigma)
    assert_within_3_se(est.grad_sq_norm, p.grad_sq_norm)
    # without the n/(n−1) correction the same data are clearly biased
    naive = g.square().sum(-1).mean(-1) - g.mean(1).square().sum(-1)
    se = float(naive.std() / math.sqrt(naive.numel()))
    assert p.trace_sigma - float(naive.mean()) > 10 * se


def test_two_batch_estimator_is_unbiased_and_agrees_with_per_example():
    p, gen = problem(), torch.Generator().manual_seed(2)
    batches, n, k = 20_000, 32, 4
    g = p.grads(gen, batches, n)
    micro = g.reshape(batches, k, n // k, -1).mean(2)  # (R, k, d) mean gradient of each micro-batch
    small = micro.square().sum(-1).mean(-1)  # average over the k micro-batches
    two = two_batch_estimate(small, g.mean(1).square().sum(-1), n // k, n)
    per = per_example_estimates(g)
    assert_within_3_se(two.trace_sigma, p.trace_sigma)
    assert_within_3_se(two.grad_sq_norm, p.grad_sq_norm)
    # on the same batches: the paired differences average to zero
    assert_within_3_se(two.trace_sigma - per.trace_sigma, 0.0)
    assert_within_3_se(two.grad_sq_norm - per.grad_sq_norm, 0.0)


def _end_to_end(steps: int, n: int, beta: float, seed: int, snr: bool = False):
    """NoiseScale (and ParamSNR) fed `steps` fresh batches through PerExample at fixed w."""
    p, gen = problem(), torch.Generator().manual_seed(seed)
    model = nn.Linear(4, 1, bias=False).double()
    w_star = torch.randn(4, dtype=D, generator=gen)
    with torch.no_grad():
        model.weight.copy_((w_star + p.delta)[None])
    noise, param_snr = NoiseScale(beta), ParamSNR(beta)
    xs, epss = p.sample(gen, steps, n)  # all batches at once: (steps, n, d), (steps, n)
    with pergrad.PerExample(model, second_moment=snr) as pe:
        for x, eps in zip(xs, epss):
            model.zero_grad()
            result = pe.backward(0.5 * (model(x).squeeze(1) - (x @ w_star + eps)).square())
            noise.update(result)
            if snr:
                param_snr.update(result, {"weight": model.weight.grad})
    return p, noise, param_snr


def test_noise_scale_recovers_b_simple_end_to_end():
    p, noise, _ = _end_to_end(steps=800, n=256, beta=0.995, seed=3)
    assert noise.b_simple == pytest.approx(p.b_simple, rel=0.05)
    assert noise.trace_sigma == pytest.approx(p.trace_sigma, rel=0.05)
    assert noise.grad_sq_norm == pytest.approx(p.grad_sq_norm, rel=0.05)
    lower, upper = noise.interval(0.95)
    assert lower < p.b_simple < upper
    assert upper - lower < 0.1 * p.b_simple
    assert noise.b_simple_note is None


def test_mean_of_per_batch_ratios_is_biased_ratio_of_means_is_not():
    p, gen = problem(), torch.Generator().manual_seed(4)
    est = per_example_estimates(p.grads(gen, 5_000, 256))  # |G|²̂ stays positive at n = 256
    assert bool((est.grad_sq_norm > 0).all())
    ratios = est.trace_sigma / est.grad_sq_norm
    se = float(ratios.std() / math.sqrt(ratios.numel()))
    assert float(ratios.mean()) - p.b_simple > max(10 * se, 0.04 * p.b_simple)  # +7%: Jensen
    state = NoiseState.init(1).update(BatchEstimate(est.trace_sigma[:1], est.grad_sq_norm[:1]), 1.0)
    for t, g in zip(est.trace_sigma[1:], est.grad_sq_norm[1:]):
        state = state.update(BatchEstimate(t[None], g[None]), 1.0)
    final = state.finalize(0.997)  # a 3-standard-error interval
    assert float(final.lower) < p.b_simple < float(final.upper)
    assert float(final.b_simple) == pytest.approx(p.b_simple, rel=0.01)


def test_interval_covers_the_truth_at_its_level():
    p, gen = problem(), torch.Generator().manual_seed(5)
    chains, n = 1000, 32  # 1000 independent NoiseStates as the coordinates of one
    state = NoiseState.init(chains)
    for _ in range(12):
        est = per_example_estimates(p.grads(gen, 10 * chains, n))  # 10 steps at a time
        for t, g in zip(est.trace_sigma.reshape(10, chains), est.grad_sq_norm.reshape(10, chains)):
            state = state.update(BatchEstimate(t, g), 0.98)
    final = state.finalize(0.95)
    covered = ((final.lower <= p.b_simple) & (p.b_simple <= final.upper)).double().mean()
    assert 0.92 <= float(covered) <= 0.975


def test_snr_recovers_elementwise_truth_and_matches_noise_scale():
    p, noise, param_snr = _end_to_end(steps=400, n=256, beta=0.99, seed=6, snr=True)
    snr = param_snr.estimates()["weight"]
    # the smoothed signal of an element has a standard error of about 1e-3 × its noise here
    torch.testing.assert_close(snr.elementwise[0], p.elementwise_snr, rtol=0.05, atol=0.005)
    param = noise.param_estimates()["weight"]
    assert snr.snr == pytest.approx(1 / param.b_simple, rel=1e-10)
    assert snr.snr == pytest.approx(1 / p.b_simple, rel=0.05)
