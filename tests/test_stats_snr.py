"""SNRState: identities with the per-batch estimators, merging, and refusals."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import pergrad
from pergrad.stats import ParamSNR, SNRState, StatsWarning, param_batch_estimates


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def _batches(model, count: int, n: int = 5, reduction: str = "mean"):
    """(result, batch_grads) for `count` batches."""
    xs = torch.randn(count, n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with pergrad.PerExample(model, second_moment=True, grads=True) as pe:
        for x in xs:
            model.zero_grad()
            result = pe.backward(model(x).square().sum(1) + x.sum(1), reduction=reduction)
            yield result, {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_one_batch_sums_are_the_unbiased_elementwise_estimates(reduction):
    (result, grads), = _batches(_model(), 1, n=6, reduction=reduction)
    state = SNRState.init().update(result, grads, beta=0.9)
    for name, g in result.grads.items():  # (n, *p.shape) per-example gradients
        variance = g.var(0)  # divisor n − 1
        torch.testing.assert_close(state.noise[name], variance, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(state.signal[name], g.mean(0).square() - variance / 6, rtol=1e-10, atol=1e-14)
    per_param = param_batch_estimates(result)
    for name in result.grads:  # summed over elements: the norm-based estimates
        assert float(state.noise[name].sum()) == pytest.approx(per_param[name].trace_sigma, rel=1e-10)
        assert float(state.signal[name].sum()) == pytest.approx(per_param[name].grad_sq_norm, rel=1e-10)


def test_merging_workers_equals_one_state_over_all_batches():
    batches = list(_batches(_model(), 8))
    single, first, second = SNRState.init(), SNRState.init(), SNRState.init()
    for i, (r, g) in enumerate(batches):
        single = single.update(r, g, beta=1.0)
        if i < 3:
            first = first.update(r, g, beta=1.0)
        else:
            second = second.update(r, g, beta=1.0)
    merged = first.merge(second)
    for name in single.signal:
        torch.testing.assert_close(merged.signal[name], single.signal[name], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(merged.noise[name], single.noise[name], rtol=1e-12, atol=1e-12)
    assert SNRState.init().merge(single) is single
    finals = single.finalize()
    assert set(finals) == set(batches[0][1])
    layer = finals["0.weight"]
    assert layer.elementwise.shape == (4, 3)
    assert layer.snr == pytest.approx(
        max(float(single.signal["0.weight"].sum()), 0) / float(single.noise["0.weight"].sum()), rel=1e-12
    )


def test_conventions_where_there_is_no_noise():
    signal = torch.tensor([1.0, 0.0, -1.0, 2.0], dtype=torch.float64)
    noise = torch.tensor([0.0, 0.0, 1.0, 4.0], dtype=torch.float64)
    snr = SNRState({"w": signal}, {"w": noise}).finalize()["w"]
    assert snr.elementwise[0] == math.inf  # signal without noise
    assert math.isnan(snr.elementwise[1])  # neither
    assert snr.elementwise[2] == 0.0  # negative signal estimate: clipped
    assert snr.elementwise[3] == 0.5
    assert snr.snr == pytest.approx(2.0 / 5.0)


def test_refusals():
    model = _model()
    (result, grads), = _batches(model, 1)
    accumulated = {k: 2 * g for k, g in grads.items()}
    with pytest.raises(ValueError, match="accumulated"):
        SNRState.init().update(result, accumulated)
    with pytest.raises(ValueError, match="no gradient for parameter"):
        SNRState.init().update(result, {})
    x = torch.randn(4, 3, dtype=torch.float64)
    with pergrad.PerExample(model) as pe:
        no_moments = pe.backward(model(x).square().sum(1))
    with pytest.raises(ValueError, match="second_moment=True"):
        SNRState.init().update(no_moments, grads)
    (one, one_grads), = _batches(model, 1, n=1)
    state = SNRState.init()
    with pytest.warns(StatsWarning, match="n=1"):
        assert state.update(one, one_grads) is state


def test_param_snr_wraps_the_state_and_survives_a_checkpoint(tmp_path):
    batches = list(_batches(_model(), 6))
    tracker, state = ParamSNR(beta=0.8), SNRState.init()
    for r, g in batches:
        tracker.update(r, g)
        state = state.update(r, g, beta=0.8)
    assert tracker.layer_snr() == {k: e.snr for k, e in state.finalize().items()}
    torch.save(tracker.state_dict(), tmp_path / "snr.pt")
    restored = ParamSNR(beta=0.8)
    restored.load_state_dict(torch.load(tmp_path / "snr.pt", weights_only=True))
    assert restored.layer_snr() == tracker.layer_snr()
    with pytest.raises(ValueError, match="saved ParamSNR"):
        ParamSNR(beta=0.5).load_state_dict(tracker.state_dict())
    other = ParamSNR(beta=0.8)
    other.merge(tracker)
    assert other.layer_snr() == tracker.layer_snr()
