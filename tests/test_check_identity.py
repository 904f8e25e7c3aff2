"""check_identity: it holds on every supported layer, fails on coupled models and on a wrong pergrad
result, and refuses a scalar loss."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from cases import ALL_CASES, build
from pergrad import PerExample
from pergrad.checks.identity import check_identity
from reference import per_example_loss


@pytest.mark.parametrize("case", ALL_CASES, ids=str)
def test_identity_holds_in_float64_on_every_supported_layer(case):
    model = build(case)
    gen = torch.Generator().manual_seed(1)
    x = case.make_input(5, gen)
    with torch.no_grad():
        target = torch.randn(model(x).shape, generator=gen, dtype=torch.float64)
    report = check_identity(model, x, target, per_example_loss, on_unsupported=case.on_unsupported)
    assert report.passed, report.explanation
    assert report.max_rel_diff <= 1e-10 and report.pergrad_max_rel_diff <= 1e-10
    assert all(p.grad is None for p in model.parameters()), "the caller's model is untouched"


def test_a_model_pergrad_refuses_does_not_pass():
    """The identity holds, but pergrad's one-pass result cannot be checked: not passed, and why."""
    case = next(c for c in ALL_CASES if c.on_unsupported == "fallback")
    x = case.make_input(5, torch.Generator().manual_seed(1))
    model = build(case)
    with torch.no_grad():
        target = torch.zeros(model(x).shape, dtype=torch.float64)
    report = check_identity(model, x, target, per_example_loss)
    assert report.identity_holds and not report.passed and report.pergrad_max_rel_diff is None
    assert "pergrad refused the model" in report.explanation and "no per-example rule" in report.explanation


def test_a_wrong_pergrad_result_does_not_pass(monkeypatch):
    """pergrad's one-pass gradients count: scaled by 1.01, the check fails though the identity holds."""
    model, (x, y) = _mlp(nn.Tanh()), _batch()
    backward = PerExample.backward

    def skewed(self, losses, reduction="mean"):
        result = backward(self, losses, reduction)
        return dataclasses.replace(result, grads={k: 1.01 * g for k, g in result.grads.items()})

    monkeypatch.setattr(PerExample, "backward", skewed)
    report = check_identity(model, x, y, per_example_loss)
    assert report.identity_holds and not report.passed
    assert report.pergrad_max_rel_diff == pytest.approx(0.01, rel=1e-6)
    assert "do NOT match" in report.explanation


def test_scalar_loss_is_refused():
    model = nn.Linear(3, 1)
    with pytest.raises(ValueError, match="one loss per example"):
        check_identity(model, torch.randn(4, 3), torch.randn(4, 1), lambda out, y: ((out - y) ** 2).mean())


class BatchCentering(nn.Module):
    """Subtracts the batch mean of its input: every example's output depends on the others."""

    def forward(self, x):
        return x - x.mean(0, keepdim=True)


class NextExample(nn.Module):
    """Adds the next example's features (cyclically): example i sees example i+1."""

    def forward(self, x):
        return x + 0.5 * x.roll(-1, 0)


def _mlp(middle: nn.Module) -> nn.Module:
    """Examples of 3 positions × 4 features; ``middle`` sees (n, 3 channels, 6 features)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), middle, nn.Tanh(), nn.Linear(6, 2)).double()


def _batch(n=6):
    gen = torch.Generator().manual_seed(3)
    return torch.randn(n, 3, 4, generator=gen, dtype=torch.float64), torch.randn(n, 3, 2, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize(
    "middle, culprit",
    [
        (nn.BatchNorm1d(3), "'1' (BatchNorm1d in training mode) normalises with batch statistics"),
        (BatchCentering(), "'1' (BatchCentering): its output for one example depends on other examples' inputs"),
        (NextExample(), "'1' (NextExample): its output for one example depends on other examples' inputs"),
    ],
    ids=["batchnorm-train", "batch-centering", "example-mixing"],
)
def test_identity_fails_on_coupled_models_and_names_the_cause(middle, culprit):
    x, y = _batch()
    report = check_identity(_mlp(middle), x, y, per_example_loss)
    assert not report.passed and not report.identity_holds
    assert report.max_rel_diff > 1e-3  # far beyond rounding: a real difference
    assert "does NOT hold" in report.explanation and culprit in report.explanation


def test_batchnorm_that_cannot_see_one_example_alone_fails_with_the_forward_error():
    """BatchNorm1d in training mode refuses a batch of one: the identity cannot hold, and says why."""
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2)).double()
    x, y = _batch()
    report = check_identity(model, x[:, 0], y[:, 0], per_example_loss)
    assert not report.passed and report.max_rel_diff == float("inf")
    assert "one example alone fails" in report.explanation and "more than 1 value per channel" in report.explanation
    assert "coupled by '1' (BatchNorm1d in training mode)" in report.explanation


@pytest.mark.parametrize("middle", [nn.LayerNorm(6), nn.BatchNorm1d(3).eval()], ids=["layernorm", "batchnorm-eval"])
def test_identity_and_pergrad_pass_on_models_without_coupling(middle):
    model = _mlp(middle)
    if isinstance(middle, nn.BatchNorm1d):  # non-trivial running statistics, so eval mode matters
        middle.running_mean.uniform_(-1, 1)
        middle.running_var.uniform_(0.5, 2)
    x, y = _batch()
    report = check_identity(model, x, y, per_example_loss)
    assert report.passed, report.explanation
    assert report.max_rel_diff <= 1e-10 and report.pergrad_max_rel_diff <= 1e-10
    assert "holds" in report.explanation and "match them" in report.explanation
