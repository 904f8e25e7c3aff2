"""A backward run by someone else (a framework's ``loss.backward()``) is measured: micro-batches
gathered into one step's result, GradScaler's scale taken out, token-averaged losses defined."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pergrad

from reference import per_example_loss, reference_grads
from test_model_patterns import TokensOnTheModel

N, T, D = 8, 4, 6


def _model():
    torch.manual_seed(0)
    return TokensOnTheModel().double()


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, T, D, generator=g, dtype=torch.float64) * 2, torch.randn(N, T + 1, D, generator=g, dtype=torch.float64)


def _close(a, b, tol=1e-10):
    return (a - b).abs().max() <= tol * b.abs().max()


@pytest.mark.parametrize("k", [1, 2, 4])
def test_k_micro_batch_backwards_equal_one_backward_of_the_whole_batch(k):
    model, (x, y) = _model(), _batch()
    with pergrad.PerExample(model, second_moment=True, grads=True) as pe:
        whole = pe.backward(per_example_loss(model(x), y))
    whole_grad = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    with pergrad.PerExample(model, second_moment=True, grads=True) as pe:
        for xs, ys in zip(x.chunk(k), y.chunk(k)):
            (per_example_loss(model(xs), ys).mean() / k).backward()  # as Lightning accumulates
        gathered = pe.result("mean")
    assert gathered.n == N
    assert _close(gathered.sq_norms, whole.sq_norms)
    assert _close(gathered.batch_grad_sq_norm, whole.batch_grad_sq_norm)
    for name in whole.grads:
        assert _close(gathered.grads[name], whole.grads[name]), name
        assert _close(gathered.second_moment[name], whole.second_moment[name]), name
    assert all(_close(p.grad, g) for p, g in zip(model.parameters(), whole_grad))
    # and against the independent reference
    want = reference_grads(model, x, y)
    assert _close(gathered.sq_norms, sum(w.reshape(N, -1).square().sum(1) for w in want.values()))


def test_sum_reduction_and_a_new_gathering_after_each_result():
    model, (x, y) = _model(), _batch()
    want = sum(w.reshape(N, -1).square().sum(1) for w in reference_grads(model, x, y).values())
    with pergrad.PerExample(model) as pe:
        per_example_loss(model(x), y).sum().backward()
        assert _close(pe.result("sum").sq_norms, want)
        with pytest.raises(pergrad.CaptureError, match="No backward pass was measured"):
            pe.result()
        model.zero_grad()
        per_example_loss(model(x[:3]), y[:3]).mean().backward()
        assert _close(pe.result().sq_norms, want[:3])


def test_grad_scaler_scaled_loss_gives_unscaled_results():
    model, (x, y) = _model(), _batch()
    want = sum(w.reshape(N, -1).square().sum(1) for w in reference_grads(model, x, y).values())
    scaler = torch.amp.GradScaler("cpu", init_scale=512.0)
    with pergrad.PerExample(model) as pe:
        scaler.scale(per_example_loss(model(x), y).mean()).backward()
        scaled = pe.result(loss_scale=scaler.get_scale())
    assert _close(scaled.sq_norms, want)
    model.zero_grad()
    with pergrad.PerExample(model) as pe:
        per_example_loss(model(x), y).mean().backward()
        plain = pe.result()
    assert _close(scaled.batch_grad_sq_norm, plain.batch_grad_sq_norm)


def test_token_averaged_loss_defines_each_examples_loss_as_its_token_sum_scaled():
    """Hugging Face's causal-LM loss: Σ over all the batch's tokens / number of tokens. With
    ℓⱼ = (B / N_tokens) Σ_{t ∈ j} CE, that loss is (1/B) Σⱼ ℓⱼ, so reduction="mean" applies."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20, D), nn.Linear(D, 20)).double()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 20, (N, T), generator=g)
    labels = torch.randint(0, 20, (N, T), generator=g)
    labels[0, 2:] = -100  # padded tokens count for nothing
    tokens = (labels != -100).sum()
    with pergrad.PerExample(model) as pe:
        logits = model(ids)
        (F.cross_entropy(logits.transpose(1, 2), labels, reduction="sum", ignore_index=-100) / tokens).backward()
        result = pe.result("mean")
    want = []
    for j in range(N):
        model.zero_grad()
        summed = F.cross_entropy(model(ids[j : j + 1]).transpose(1, 2), labels[j : j + 1], reduction="sum", ignore_index=-100)
        (summed * N / tokens).backward()
        want.append(sum(p.grad.square().sum() for p in model.parameters()))
    assert _close(result.sq_norms, torch.stack(want))


def test_pe_backward_is_unaffected_and_not_gathered():
    model, (x, y) = _model(), _batch()
    with pergrad.PerExample(model) as pe:
        pe.backward(per_example_loss(model(x), y))
        with pytest.raises(pergrad.CaptureError):
            pe.result()


def test_reset_drops_what_was_gathered():
    model, (x, y) = _model(), _batch()
    with pergrad.PerExample(model) as pe:
        per_example_loss(model(x), y).mean().backward()
        pe.reset()
        with pytest.raises(pergrad.CaptureError):
            pe.result()
