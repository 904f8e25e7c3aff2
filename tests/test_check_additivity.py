import dataclasses

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from pergrad.checks.additivity import AdditivityReport, check_additivity


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


class Center(nn.Module):
    """Subtracts the batch mean: couples every example with every other."""

    def forward(self, x):
        return x - x.mean(0, keepdim=True)


class Net(nn.Module):
    def __init__(self, middle: nn.Module):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 6), middle, nn.Tanh(), nn.Linear(6, 3))

    def forward(self, x):
        return self.net(x)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(10, 4, generator=g), torch.randint(0, 3, (10,), generator=g)


def test_plain_mlp_passes(batch):
    torch.manual_seed(0)
    report = check_additivity(Net(nn.Identity()), *batch, ce)
    assert isinstance(report, AdditivityReport)
    assert report.passed and report.culprits == []
    assert report.max_leak <= 1e-12 and report.loss_leak <= 1e-12
    assert report.n == 10 and report.n_probed == 8
    assert "No coupling" in report.explanation
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.passed = False


def test_batchnorm_in_training_mode_is_named(batch):
    torch.manual_seed(0)
    model = Net(nn.BatchNorm1d(6)).train()
    report = check_additivity(model, *batch, ce)
    assert not report.passed
    assert report.culprits == ["net.1"]
    assert report.max_leak > 1e-3 and report.module_leaks["net.1"] > 1e-3
    assert report.module_leaks["net.0"] <= 1e-12
    assert "BatchNorm1d in training mode" in report.explanation
    assert "GroupNorm/LayerNorm" in report.explanation
    assert "not an average of independent per-example gradients" in report.explanation


def test_batchnorm_in_eval_mode_passes(batch):
    torch.manual_seed(0)
    model = Net(nn.BatchNorm1d(6)).eval()
    report = check_additivity(model, *batch, ce)
    assert report.passed and report.culprits == []


def test_batch_mixing_module_is_named(batch):
    torch.manual_seed(0)
    report = check_additivity(Net(Center()), *batch, ce)
    assert not report.passed
    assert report.culprits == ["net.1"]
    assert "'net.1' (Center)" in report.explanation


def test_in_batch_negatives_loss_is_named(batch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5))

    def in_batch_negatives(z, _):
        logits = z @ z.T  # (n, n)
        return F.cross_entropy(logits, torch.arange(z.shape[0]), reduction="none")

    report = check_additivity(model, batch[0], batch[1], in_batch_negatives)
    assert not report.passed
    assert report.culprits == ["loss"]
    assert report.loss_leak > 1e-3
    assert "in-batch negatives" in report.explanation


def test_token_inputs_are_probed_at_the_embedding():
    torch.manual_seed(0)
    tokens = torch.randint(0, 7, (5, 3))
    y = torch.randint(0, 3, (5,))
    plain = nn.Sequential(nn.Embedding(7, 4), nn.Flatten(), nn.Linear(12, 3))
    assert check_additivity(plain, tokens, y, ce).passed
    mixing = nn.Sequential(nn.Embedding(7, 4), nn.Flatten(), Center(), nn.Linear(12, 3))
    report = check_additivity(mixing, tokens, y, ce)
    assert not report.passed and report.culprits == ["2"]


def test_model_is_untouched(batch):
    torch.manual_seed(0)
    model = Net(nn.BatchNorm1d(6)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    check_additivity(model, *batch, ce)
    assert model.training and all(m.training for m in model.modules())
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    assert all(p.grad is None for p in model.parameters())

    model.eval()
    check_additivity(model, *batch, ce)
    assert not any(m.training for m in model.modules())


def test_loss_must_be_per_example(batch):
    with pytest.raises(ValueError, match="reduction='none'"):
        check_additivity(Net(nn.Identity()), *batch, lambda out, y: F.cross_entropy(out, y))
