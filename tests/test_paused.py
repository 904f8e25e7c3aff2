"""``pe.paused()``: the hooks stay attached and capture nothing; steps inside it leave ``.grad``
exactly as an unhooked model would, and the measured steps around them are unchanged."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import pergrad
from pergrad import capture as capture_module

from reference import per_example_loss
from test_model_patterns import TokensOnTheModel

N, T, D = 8, 4, 6


def _model():
    torch.manual_seed(0)
    return TokensOnTheModel().double()  # direct mode (tokens on the model) and a sequence Linear


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, T, D, generator=g, dtype=torch.float64) * 2, torch.randn(N, T + 1, D, generator=g, dtype=torch.float64)


def _plain_grads(model, x, y):
    """.grad of ∇ mean loss from an unhooked copy of the model."""
    plain = copy.deepcopy(model)
    plain.zero_grad(set_to_none=True)
    per_example_loss(plain(x), y).mean().backward()
    return {k: p.grad for k, p in plain.named_parameters()}


@pytest.fixture
def counted(monkeypatch):
    """Counts of the trackers and direct modes started by the capture."""
    counts = {"tracker": 0, "direct": 0}

    class CountingTracker(capture_module.Tracker):
        def __enter__(self):
            counts["tracker"] += 1
            return super().__enter__()

    class CountingMode(capture_module.DirectMode):
        def __enter__(self):
            counts["direct"] += 1
            return super().__enter__()

    monkeypatch.setattr(capture_module, "Tracker", CountingTracker)
    monkeypatch.setattr(capture_module, "DirectMode", CountingMode)
    return counts


def test_paused_captures_nothing_and_leaves_grad_exact(counted):
    model, (x, y) = _model(), _batch()
    want = _plain_grads(model, x, y)
    # second moments: the sequence Linear's rule builds its batch gradient in the backward (detach hook)
    with pergrad.PerExample(model, second_moment=True) as pe:
        measured = pe.backward(per_example_loss(model(x), y))
        assert counted["tracker"] >= 1 and counted["direct"] >= 1  # the counters see a captured step
        counted.update(tracker=0, direct=0)
        model.zero_grad(set_to_none=True)
        with pe.paused():
            assert pe.is_paused
            out = model(x)
            assert not any(t.calls for t in pe._capture.targets)
            per_example_loss(out, y).mean().backward()
        assert not pe.is_paused
        assert counted == {"tracker": 0, "direct": 0}
        assert pe._gathered == []
        for k, p in model.named_parameters():
            assert torch.equal(p.grad, want[k]) or torch.allclose(p.grad, want[k], rtol=0, atol=1e-12), k
        with pytest.raises(pergrad.CaptureError, match="No backward pass was measured"):
            pe.result()
        # the next measured step is what it would have been without the paused one
        model.zero_grad(set_to_none=True)
        again = pe.backward(per_example_loss(model(x), y))
    assert torch.allclose(again.sq_norms, measured.sq_norms, rtol=1e-10, atol=0)


def test_forward_inside_paused_backward_outside_is_not_measured():
    model, (x, y) = _model(), _batch()
    with pergrad.PerExample(model) as pe:
        with pe.paused():
            losses = per_example_loss(model(x), y)
        losses.mean().backward()  # the forward was not captured: not measured
        with pytest.raises(pergrad.CaptureError, match="No backward pass was measured"):
            pe.result()
        with pe.paused():
            losses = per_example_loss(model(x), y)
        with pytest.raises(pergrad.CaptureError, match="outside pe.paused"):
            pe.backward(losses)


def test_backward_inside_paused_of_a_captured_forward_is_not_gathered():
    model, (x, y) = _model(), _batch()
    want = _plain_grads(model, x, y)
    with pergrad.PerExample(model, second_moment=True) as pe:
        losses = per_example_loss(model(x), y)  # captured
        with pe.paused():
            losses.mean().backward()
        assert pe._gathered == [] and not any(t.calls for t in pe._capture.targets)
        for k, p in model.named_parameters():
            assert torch.allclose(p.grad, want[k], rtol=1e-12, atol=0), k
        with pytest.raises(pergrad.CaptureError, match="No backward pass was measured"):
            pe.result()


def test_paused_then_measured_micro_batch_measures_only_the_second():
    """A backward whose forward was paused, then one whose forward was not: only the second is
    gathered (its examples alone), while .grad holds both."""
    model, (x, y) = _model(), _batch()
    x2, y2 = _batch(seed=2)
    with pergrad.PerExample(model) as pe:
        with pe.paused():
            per_example_loss(model(x), y).mean().backward()
        per_example_loss(model(x2), y2).mean().backward()
        got = pe.result("mean")
    with pergrad.PerExample(copy.deepcopy(model)) as pe2:
        alone = pe2.backward(per_example_loss(pe2.model(x2), y2))
    assert got.n == N
    assert torch.allclose(got.sq_norms, alone.sq_norms, rtol=1e-10, atol=0)


def test_backward_of_per_example_inside_paused_raises():
    model, (x, y) = _model(), _batch()
    with pergrad.PerExample(model) as pe:
        losses = per_example_loss(model(x), y)
        with pe.paused(), pytest.raises(pergrad.CaptureError, match="inside pe.paused"):
            pe.backward(losses)


def test_internal_pause_inside_paused_keeps_it_paused():
    model, (x, y) = _model(), _batch()
    with pergrad.PerExample(model) as pe:
        with pe.paused():
            with pe._capture.paused():  # as a rule's recomputation does
                pass
            model(x)
            assert not any(t.calls for t in pe._capture.targets)
        model(x)
        assert any(t.calls for t in pe._capture.targets)


def test_distributed_per_example_paused_step_leaves_the_same_mean_gradient():
    model, (x, y) = _model(), _batch()
    with pergrad.DistributedPerExample(model) as dpe:
        for part in (slice(0, 3), slice(3, N)):
            dpe.backward(per_example_loss(model(x[part]), y[part]))
        dpe.step()
        measured = {k: p.grad.clone() for k, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        with dpe.paused():
            for part in (slice(0, 3), slice(3, N)):
                assert dpe.backward(per_example_loss(model(x[part]), y[part])) is None
            n, sums = dpe.plain_step(torch.tensor([2.0]))
        assert n == N and sums.tolist() == [2.0]
        for k, p in model.named_parameters():
            assert torch.allclose(p.grad, measured[k], rtol=1e-12, atol=1e-15), k
        # a step is measured whole or not at all
        model.zero_grad(set_to_none=True)
        dpe.backward(per_example_loss(model(x), y))
        with dpe.paused(), pytest.raises(ValueError, match="all be measured or all run inside"):
            dpe.backward(per_example_loss(model(x), y))
        with pytest.raises(ValueError, match="plain_step ends a step"):
            dpe.plain_step()


def test_paused_step_costs_no_saved_tensors_on_a_plain_model():
    """No call kept, nothing stored on the modules: the capture holds nothing after a paused step."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    with pergrad.PerExample(model) as pe, pe.paused():
        model(x).sum().backward()
        assert pe._capture.n_forward is None and pe._capture._tracker is None
