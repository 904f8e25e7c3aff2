"""The preconditioned noise scale B_P = tr(PΣ) / GᵀPG and Adam's P.

Ground truth: x ~ N(0, H) with H diagonal and anisotropic, y = xᵀw* + ε, ε ~ N(0, σ²),
ℓ = ½(xᵀw − y)², δ = w − w*. Then (Isserlis) G = Hδ, Σ = (δᵀHδ + σ²) H + Hδ δᵀH, so for a
fixed diagonal P: tr(PΣ) = (δᵀHδ + σ²) tr(PH) + δᵀHPHδ and GᵀPG = δᵀHPHδ.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pergrad
from pergrad.distributed import DistributedPerExample
from pergrad.stats import NoiseScale, adam_preconditioner
from pergrad.stats.batch import _estimates

D = torch.float64


def closed_form(h, delta, sigma, p):
    """tr(PΣ), GᵀPG for diagonal H = diag(h), P = diag(p)."""
    hd = h * delta
    quad = float((delta * hd).sum()) + sigma**2
    g_p_g = float((p * hd.square()).sum())
    return quad * float((p * h).sum()) + g_p_g, g_p_g


def run_noise_scales(h, delta, sigma, p, steps=300, n=128, seed=0):
    """NoiseScale and NoiseScale(preconditioner=P) fed the same batches through PerExample."""
    gen = torch.Generator().manual_seed(seed)
    d = h.numel()
    model = nn.Linear(d, 1, bias=False).double()
    w_star = torch.randn(d, dtype=D, generator=gen)
    with torch.no_grad():
        model.weight.copy_((w_star + delta)[None])
    plain = NoiseScale(1.0)
    precond = NoiseScale(1.0, preconditioner=lambda: {"weight": p[None]})
    x_all = torch.randn(steps, n, d, dtype=D, generator=gen) * h.sqrt()
    eps_all = sigma * torch.randn(steps, n, dtype=D, generator=gen)
    with pergrad.PerExample(model, second_moment=True) as pe:
        for x, eps in zip(x_all, eps_all):
            model.zero_grad()
            result = pe.backward(0.5 * (model(x).squeeze(1) - (x @ w_star + eps)).square())
            plain.update(result)
            precond.update(result)
    return plain, precond


# mild: a spread of curvatures, P like Adam's (larger where the gradient is small);
# several: the error along the steepest direction, P = 1/H flattens it, B_P ≈ 5 × B_simple
CASES = {
    "mild": (torch.tensor([4.0, 2.0, 1.0, 0.5, 0.25, 0.125], dtype=D), torch.tensor([0.3, -0.2, 0.5, 0.4, -0.6, 1.0], dtype=D)),
    "several": (torch.tensor([100.0] + [1.0] * 9, dtype=D), torch.tensor([1.0] + [0.0] * 9, dtype=D)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_b_precond_recovers_the_closed_form_for_anisotropic_linear_regression(case):
    h, delta = CASES[case]
    sigma = 1.0
    p = 1.0 / h if case == "several" else 1.0 / (h * (h * delta.square()).sum() + h.square() * delta.square()).sqrt()
    plain, precond = run_noise_scales(h, delta, sigma, p)
    trace_p, g_p_g = closed_form(h, delta, sigma, p)
    trace, g_sq = closed_form(h, delta, sigma, torch.ones_like(h))
    e = precond.estimate()
    assert e.trace_sigma == pytest.approx(trace_p, rel=0.1)
    assert e.grad_sq_norm == pytest.approx(g_p_g, rel=0.1)
    assert e.b_simple == pytest.approx(trace_p / g_p_g, rel=0.1)
    assert e.lower < trace_p / g_p_g < e.upper
    assert plain.b_simple == pytest.approx(trace / g_sq, rel=0.1)
    if case == "several":  # the two predictors differ by several times, and each estimate finds its own
        assert (trace_p / g_p_g) / (trace / g_sq) > 4
        assert precond.b_simple / plain.b_simple > 4
        assert precond.estimate().lower > plain.estimate().upper


def test_unit_and_scaled_preconditioners_give_b_simple_exactly():
    """P = 1 is the plain estimator (one formula), and B_P does not depend on P's scale."""
    h, delta = CASES["mild"]
    plain, p_ones = run_noise_scales(h, delta, 1.0, torch.ones_like(h), steps=20)
    _, p_scaled = run_noise_scales(h, delta, 1.0, torch.full_like(h, 1e-3), steps=20)
    for field in ("trace_sigma", "grad_sq_norm", "b_simple", "lower", "upper"):
        assert getattr(p_ones.estimate(), field) == pytest.approx(getattr(plain.estimate(), field), rel=1e-10)
    assert p_scaled.b_simple == pytest.approx(p_ones.b_simple, rel=1e-10)
    assert p_scaled.trace_sigma == pytest.approx(1e-3 * p_ones.trace_sigma, rel=1e-10)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.Adam(ps, lr=0.01, betas=(0.8, 0.9), eps=1e-3),
        lambda ps: torch.optim.AdamW(ps, lr=0.01, betas=(0.9, 0.95), eps=1e-2, weight_decay=0.1),
        lambda ps: torch.optim.Adam(ps, lr=0.01, betas=(0.9, 0.9), eps=1e-3, amsgrad=True),
    ],
    ids=["adam", "adamw", "amsgrad"],
)
def test_adam_preconditioner_matches_a_hand_computation_from_the_optimizer_state(make):
    model = _mlp()
    optimizer = make(model.parameters())
    group = optimizer.param_groups[0]
    beta2, eps, amsgrad = group["betas"][1], group["eps"], group["amsgrad"]
    precond = adam_preconditioner(optimizer, model)
    assert precond() is None  # no state before the first step
    gen = torch.Generator().manual_seed(1)
    seen = {name: [] for name, _ in model.named_parameters()}
    for _ in range(4):
        optimizer.zero_grad()
        x = torch.randn(6, 5, dtype=D, generator=gen) * torch.rand(1, generator=gen, dtype=D) * 3
        model(x).square().sum().backward()
        for name, q in model.named_parameters():
            seen[name].append(q.grad.clone())
        optimizer.step()
    got = precond()
    assert set(got) == set(seen)
    for name, grads in seen.items():
        t = len(grads)
        v, v_max = torch.zeros_like(grads[0]), torch.zeros_like(grads[0])
        for g in grads:
            v = beta2 * v + (1 - beta2) * g.square()
            v_max = torch.maximum(v_max, v)
        v_hat = (v_max if amsgrad else v) / (1 - beta2**t)
        torch.testing.assert_close(got[name], 1.0 / (v_hat.sqrt() + eps), rtol=0, atol=1e-10)


def test_adam_preconditioner_refuses_other_optimizers_and_foreign_parameters():
    model = _mlp()
    with pytest.raises(TypeError, match="Adam or AdamW"):
        adam_preconditioner(torch.optim.SGD(model.parameters(), lr=0.1), model)
    with pytest.raises(ValueError, match="not in the model"):
        adam_preconditioner(torch.optim.Adam(_mlp().parameters()), model)


def test_a_preconditioner_missing_a_parameter_is_named():
    model = _mlp()
    noise = NoiseScale(0.9, preconditioner=lambda: {"0.weight": torch.ones(7, 5, dtype=D)})
    with pergrad.PerExample(model, second_moment=True) as pe:
        result = pe.backward(model(torch.randn(4, 5, dtype=D)).square().sum(1))
    with pytest.raises(ValueError, match="'0.bias'"):
        noise.update(result)


def test_merged_micro_batches_give_the_single_batch_b_precond():
    """StepResult.estimate(preconditioner=P) over micro-batches (the merge of data-parallel
    workers) equals the preconditioned estimate of one backward on the whole batch."""
    model = _mlp()
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(10, 5, dtype=D, generator=gen), torch.randn(10, 3, dtype=D, generator=gen)
    weights = {name: torch.rand(q.shape, dtype=D, generator=gen) + 0.1 for name, q in model.named_parameters()}
    with pergrad.PerExample(model, second_moment=True) as pe:
        result = pe.backward((model(x) - y).square().sum(1))
        whole, unweighted = _estimates(result, None, weights), _estimates(result, None)
    model.zero_grad()
    with DistributedPerExample(model, second_moment=True) as dpe:
        for idx in (slice(0, 3), slice(3, 10)):
            dpe.backward((model(x[idx]) - y[idx]).square().sum(1))
        merged = dpe.step().estimate(preconditioner=weights)
    torch.testing.assert_close(merged.trace_sigma, whole.trace_sigma, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(merged.grad_sq_norm, whole.grad_sq_norm, rtol=1e-10, atol=1e-12)
    assert float(whole.trace_sigma[0]) < 0.9 * float(unweighted.trace_sigma[0])  # the weights were applied


def test_merging_a_plain_and_a_preconditioned_noise_scale_is_refused():
    with pytest.raises(ValueError, match="preconditioned"):
        NoiseScale(0.9).merge(NoiseScale(0.9, preconditioner=lambda: {}))
