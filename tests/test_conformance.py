"""Every registered rule against torch.func.vmap(grad(functional_call)) in float64."""

from __future__ import annotations

import pytest
import torch

import pergrad
from cases import ALL_CASES, RULE_CASES, Case, build
from reference import per_example_loss, reference_grads, rel_err

TOL = 1e-10


def test_every_registered_rule_has_cases():
    missing = [cls.__name__ for cls in pergrad.registered_rules() if not RULE_CASES.get(cls)]
    assert not missing, f"registered rules without conformance cases: {missing}"


def _problem(case: Case, n: int):
    """The case's model, a batch of n inputs, targets, and the reference per-example gradients."""
    model = build(case)
    gen = torch.Generator().manual_seed(n)
    x = case.make_input(n, gen)
    with torch.no_grad():
        target = torch.randn(model(x).shape, generator=gen, dtype=torch.float64)
    return model, x, target, reference_grads(model, x, target)


def _run(case: Case, n: int, reduction: str, grads: bool):
    model, x, target, ref = _problem(case, n)
    # the first-backward check off: every number here must be right without the safety net
    with pergrad.PerExample(
        model, grads=grads, second_moment=True, on_unsupported=case.on_unsupported, verify=False
    ) as pe:
        result = pe.backward(per_example_loss(model(x), target), reduction=reduction)
    return model, ref, result


@pytest.mark.parametrize("grads", [False, True], ids=["norms", "grads"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("n", [1, 2, 7])
@pytest.mark.parametrize("case", ALL_CASES, ids=str)
def test_rule_matches_reference(case, n, reduction, grads):
    model, ref, result = _run(case, n, reduction, grads)
    assert result.n == n and result.reduction == reduction
    assert list(result.param_sq_norms) == list(ref), "names as in model.named_parameters()"
    for name, g in ref.items():
        ref_sq = g.reshape(n, -1).square().sum(1)
        assert rel_err(result.param_sq_norms[name], ref_sq) <= TOL, name
        assert rel_err(result.second_moment[name], g.square().sum(0)) <= TOL, name
        if grads:
            assert rel_err(result.grads[name], g) <= TOL, name
        batch = g.mean(0) if reduction == "mean" else g.sum(0)
        assert rel_err(model.get_parameter(name).grad, batch) <= TOL, name
        assert rel_err(result.param_batch_grad_sq_norms[name], batch.square().sum()) <= TOL, name
    total = sum(g.reshape(n, -1).square().sum(1) for g in ref.values())
    assert rel_err(result.sq_norms, total) <= TOL
    batch_sq = sum((g.mean(0) if reduction == "mean" else g.sum(0)).square().sum() for g in ref.values())
    assert rel_err(result.batch_grad_sq_norm, batch_sq) <= TOL
    if not grads:
        assert result.grads is None


@pytest.mark.parametrize("form", ["materialised", "gram"])
@pytest.mark.parametrize("case", ALL_CASES, ids=str)
def test_norms_alone_match_reference(case, form, monkeypatch):
    """Norms mode (no gradients, no second moments kept), with the per-example pieces of a
    sequence's weight either materialised in the backward pass or never built (Gram form)."""
    from pergrad.rules import _sequence

    monkeypatch.setattr(_sequence, "FORM", "materialise" if form == "materialised" else "gram")
    monkeypatch.setattr(_sequence, "CHUNK_ELEMENTS", 1)  # pieces one example at a time
    n = 5
    model, x, target, ref = _problem(case, n)
    with pergrad.PerExample(model, on_unsupported=case.on_unsupported) as pe:
        result = pe.backward(per_example_loss(model(x), target))
    for name, g in ref.items():
        assert rel_err(result.param_sq_norms[name], g.reshape(n, -1).square().sum(1)) <= TOL, name
        assert rel_err(model.get_parameter(name).grad, g.mean(0)) <= TOL, name
    assert result.second_moment is None and result.grads is None
