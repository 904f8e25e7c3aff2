"""Property tests (hypothesis) on random shapes: averaging, permutation, reductions.

The references are independent of pergrad: autograd on an unhooked copy of the model, one example
at a time and on the whole batch. Examples are drawn from a fixed seed (the "derandomized" profile
in conftest.py), so every run tests the same cases.
"""

from __future__ import annotations

import torch
import copy

from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import pergrad
from reference import per_example_loss

SETTINGS = settings(max_examples=25)


@st.composite
def models_and_inputs(draw):
    """A random MLP, sequence model or CNN, with a random batch (float64)."""
    seed = draw(st.integers(0, 2**16))
    n = draw(st.integers(1, 6))
    kind = draw(st.sampled_from(["mlp", "sequence", "cnn"]))
    torch.manual_seed(seed)
    if kind == "mlp":
        widths = draw(st.lists(st.integers(1, 9), min_size=2, max_size=4))
        layers = []
        for i, o in zip(widths, widths[1:]):
            layers += [nn.Linear(i, o), nn.Tanh()]
        model, x = nn.Sequential(*layers), torch.randn(n, widths[0])
    elif kind == "sequence":
        t, d = draw(st.integers(1, 6)), draw(st.integers(2, 8))
        model = nn.Sequential(nn.Linear(d, d), nn.LayerNorm(d), nn.GELU(), nn.Linear(d, 3))
        x = torch.randn(n, t, d)
    else:
        c, k = draw(st.integers(1, 3)), draw(st.integers(1, 3))
        size = draw(st.integers(k, 7))
        stride, groups = draw(st.integers(1, 2)), draw(st.sampled_from([1, 2]))
        model = nn.Sequential(
            nn.Conv2d(c, 2 * groups, k, stride=stride), nn.ReLU(),
            nn.Conv2d(2 * groups, 2 * groups, 1, groups=groups), nn.Flatten(), nn.LazyLinear(2),
        )
        x = torch.randn(n, c, size, size)
        model(x)  # materialise the lazy layer
    model = model.double()
    x = x.double()
    return model, x, torch.randn(model(x).shape, dtype=torch.float64)


def _run(model, x, target, reduction="mean"):
    model.zero_grad(set_to_none=True)
    with pergrad.PerExample(model, grads=True) as pe:
        result = pe.backward(per_example_loss(model(x), target), reduction=reduction)
    return result, {k: p.grad.clone() for k, p in model.named_parameters()}


def _unhooked_grads(model, x, target) -> tuple[dict, dict]:
    """On a copy pergrad never hooked: {name: (n, *p.shape)} each example's gradient from a
    forward of that example alone, and {name: p.shape} the gradient of the batch's mean loss."""
    copied = copy.deepcopy(model)
    params = dict(copied.named_parameters())

    def grads(xs, ts):
        return torch.autograd.grad(per_example_loss(copied(xs), ts).mean(), list(params.values()))

    alone = [grads(x[i : i + 1], target[i : i + 1]) for i in range(x.shape[0])]
    per_example = {k: torch.stack([g[j] for g in alone]) for j, k in enumerate(params)}
    return per_example, dict(zip(params, grads(x, target)))


@SETTINGS
@given(models_and_inputs())
def test_per_example_grads_match_autograd_one_example_at_a_time(case):
    model, x, target = case
    per_example, _ = _unhooked_grads(model, x, target)
    result, _ = _run(model, x, target)
    for name, expected in per_example.items():
        torch.testing.assert_close(result.grads[name], expected, rtol=1e-10, atol=1e-12)


@SETTINGS
@given(models_and_inputs())
def test_per_example_grads_average_to_the_gradient_of_an_unhooked_copy(case):
    model, x, target = case
    _, batch_grad = _unhooked_grads(model, x, target)
    result, grads = _run(model, x, target)
    for name, expected in batch_grad.items():
        torch.testing.assert_close(result.grads[name].mean(0), expected, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(grads[name], expected, rtol=1e-10, atol=1e-12)  # and .grad as autograd's


@SETTINGS
@given(models_and_inputs(), st.randoms(use_true_random=False))
def test_permuting_the_batch_permutes_the_results(case, rng):
    model, x, target = case
    perm = list(range(x.shape[0]))
    rng.shuffle(perm)
    perm = torch.tensor(perm)
    result, grads = _run(model, x, target)
    permuted, permuted_grads = _run(model, x[perm], target[perm])
    torch.testing.assert_close(permuted.sq_norms, result.sq_norms[perm], rtol=1e-10, atol=1e-12)
    for name in grads:
        torch.testing.assert_close(permuted.grads[name], result.grads[name][perm], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(permuted_grads[name], grads[name], rtol=1e-10, atol=1e-12)


@SETTINGS
@given(models_and_inputs())
def test_sum_and_mean_reductions_differ_by_exactly_n(case):
    model, x, target = case
    n = x.shape[0]
    mean, mean_grads = _run(model, x, target, "mean")
    total, sum_grads = _run(model, x, target, "sum")
    torch.testing.assert_close(total.sq_norms, mean.sq_norms, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(total.batch_grad_sq_norm, n**2 * mean.batch_grad_sq_norm, rtol=1e-10, atol=1e-12)
    for name in mean_grads:
        torch.testing.assert_close(sum_grads[name], n * mean_grads[name], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(total.grads[name], mean.grads[name], rtol=1e-10, atol=1e-12)
