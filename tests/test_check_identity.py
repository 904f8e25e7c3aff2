"""check_identity: the averaging identity on every supported layer, and a refused scalar loss."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cases import ALL_CASES, build
from pergrad.checks.identity import check_identity
from reference import per_example_loss


@pytest.mark.parametrize("case", ALL_CASES, ids=str)
def test_identity_holds_in_float64_on_every_supported_layer(case):
    model = build(case)
    gen = torch.Generator().manual_seed(1)
    x = case.make_input(5, gen)
    with torch.no_grad():
        target = torch.randn(model(x).shape, generator=gen, dtype=torch.float64)
    report = check_identity(model, x, target, per_example_loss)
    assert report.passed and report.max_rel_diff <= 1e-10, report.explanation
    if case.on_unsupported == "error":
        assert report.pergrad_max_rel_diff is not None and report.pergrad_max_rel_diff <= 1e-10
    assert all(p.grad is None for p in model.parameters()), "the caller's model is untouched"


def test_scalar_loss_is_refused():
    model = nn.Linear(3, 1)
    with pytest.raises(ValueError, match="one loss per example"):
        check_identity(model, torch.randn(4, 3), torch.randn(4, 1), lambda out, y: ((out - y) ** 2).mean())
