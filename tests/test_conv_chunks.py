"""Convolutions whose weight pieces are built during the backward pass, in chunks of examples:
exact against torch.func in float64, and never a whole (n, o, c/G, *kernel) tensor in norms mode."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pergrad
from memory import LargestTensor
from cases import CONV, build
from pergrad.rules import Keep, conv
from reference import per_example_loss, reference_grads, rel_err

TOL = 1e-10


def _check(model: nn.Module, x: torch.Tensor, grads: bool = False) -> None:
    """pergrad's squared norms, second moments, .grad (and per-example gradients) against the reference."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        target = torch.randn(model(x).shape, generator=gen, dtype=torch.float64)
    ref = reference_grads(model, x, target)
    model.zero_grad(set_to_none=True)
    with pergrad.PerExample(model, grads=grads, second_moment=True) as pe:
        result = pe.backward(per_example_loss(model(x), target))
    assert list(result.param_sq_norms) == list(ref)
    for name, g in ref.items():
        assert rel_err(result.param_sq_norms[name], g.flatten(1).square().sum(1)) <= TOL, name
        assert rel_err(result.second_moment[name], g.square().sum(0)) <= TOL, name
        assert rel_err(model.get_parameter(name).grad, g.mean(0)) <= TOL, name
        if grads:
            assert rel_err(result.grads[name], g) <= TOL, name


@pytest.mark.parametrize("budget", [1, 700], ids=["one-example", "uneven"])
@pytest.mark.parametrize("case", CONV, ids=str)
def test_chunked_pieces_match_the_reference(case, budget, monkeypatch):
    """Chunks of one example, and of a few (the last one shorter where they do not divide
    n = 7), give the reference norms, second moments and .grad for every convolution case."""
    monkeypatch.setattr(conv, "CHUNK_ELEMENTS", budget)
    _check(build(case), case.make_input(7, torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("frozen", ["weight", "bias"])
def test_a_frozen_parameter_leaves_the_other_exact(frozen, monkeypatch):
    """The backward builds the gradient of whichever of weight and bias is trainable."""
    monkeypatch.setattr(conv, "CHUNK_ELEMENTS", 100)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 2, 2, stride=2)).double()
    for layer in (model[0], model[2]):
        getattr(layer, frozen).requires_grad_(False)
    _check(model, torch.randn(5, 3, 6, 6, dtype=torch.float64))


@pytest.mark.parametrize(
    "layer, size",
    [(nn.Conv2d(72, 4, 2), (3, 3)), (nn.Conv1d(140, 4, 1, groups=2), (5,)), (nn.Conv2d(3, 6, 3), (6, 6))],
    ids=["wide", "wide-grouped", "convolved"],
)
@pytest.mark.parametrize("grads", [False, True], ids=["norms", "grads"])
def test_both_forms_of_the_pieces_in_chunks(layer, size, grads, monkeypatch):
    """Unfolded patches times g (more than 64 input channels per group) and the grouped
    convolution, in chunks of two examples, with and without the per-example gradients kept."""
    x = torch.randn(5, layer.in_channels, *size, dtype=torch.float64)
    t = conv.output_positions(layer, size)
    patches = layer.in_channels * layer.weight[0, 0].numel() * t if conv.unfolds(layer) else 0
    monkeypatch.setattr(conv, "CHUNK_ELEMENTS", 2 * max(layer.weight.numel(), patches))
    assert conv.chunk_size(layer, x, t) == 2
    assert conv.unfolds(layer) == (layer.in_channels > 64)
    assert "weight" in conv.ConvRule().grads_in_backward(layer, (x,), Keep(grads, False))
    _check(layer.double(), x, grads=grads)


def test_pieces_in_the_backward_replace_autograds_weight_gradient():
    """The forward runs on a detached weight and bias where the pieces are built in the
    backward (so autograd computes neither); a layer in the Gram form keeps its weight."""
    wide = nn.Conv2d(16, 16, 3)  # 2×2 outputs: t·(c·k + o) = 640 < c·k·o = 2304, the Gram form
    narrow = nn.Conv2d(2, 4, 3, padding=1)
    rule, keep = conv.ConvRule(), Keep(grads=False, second=False)
    assert rule.grads_in_backward(narrow, (torch.zeros(1, 2, 8, 8),), keep) == ("weight", "bias")
    assert rule.grads_in_backward(wide, (torch.zeros(1, 16, 4, 4),), keep) == ("bias",)
    assert rule.grads_in_backward(narrow, (torch.zeros(2, 8, 8),), keep) == ()  # unbatched
    _check(nn.Sequential(narrow, nn.Tanh(), nn.Conv2d(4, 16, 1), wide).double(), torch.randn(3, 2, 4, 4).double())


@pytest.mark.parametrize(
    "layer, size",
    [(nn.Conv2d(6, 8, 3, padding=1), (4, 4)), (nn.Conv2d(1, 16, 3, padding=1), (2, 3))],
    ids=["convolved", "unfolded"],
)
def test_norms_mode_holds_no_whole_batch_of_pieces(layer, size, monkeypatch):
    """In norms mode no operation of the backward returns n·o·(c/G)·k elements (chunks of 4
    examples here); with per-example gradients asked for, the probe does see that tensor."""
    monkeypatch.setattr(conv, "CHUNK_ELEMENTS", 4 * 8 * 6 * 9)  # 4 examples of either layer
    n = 64
    model = layer.double()
    x = torch.randn(n, layer.in_channels, *size, dtype=torch.float64)
    target = torch.zeros(model(x).shape, dtype=torch.float64)
    whole = n * model.weight.numel()
    assert whole > max(x.numel(), target.numel())  # more than any activation or output gradient
    seen = {}
    for grads in (False, True):
        with pergrad.PerExample(model, grads=grads, second_moment=True) as pe:
            losses = per_example_loss(model(x), target)
            with LargestTensor() as probe:
                pe.backward(losses)
        seen[grads] = probe.largest
    assert seen[False] < whole
    assert seen[True] >= whole


@pytest.mark.parametrize("case", CONV, ids=str)
def test_output_positions_match_the_convolution(case):
    """The count of output positions the form is chosen by, before the forward, is the output's."""
    model = build(case)
    layer = next(m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd))
    x = case.make_input(2, torch.Generator().manual_seed(0))
    assert conv.output_positions(layer, tuple(x.shape[2:])) == layer(x)[0, 0].numel()
