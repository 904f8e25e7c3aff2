"""The per-shape choice between building a sequence weight's pieces in the backward pass and
the Gram form afterwards (:func:`pergrad.rules._sequence.build_in_backward`): timed once per
shape, the faster kept; exact either way (the forms themselves: test_conformance)."""

import pytest
import torch
from torch import nn

import pergrad
from pergrad.rules import _sequence
from reference import per_example_loss, reference_grads


@pytest.fixture
def fresh(monkeypatch):
    """Measured choices, none made yet, timings replaced: {form: seconds}, and the calls seen."""
    monkeypatch.setattr(_sequence, "FORM", "measured")
    monkeypatch.setattr(_sequence, "_BUILD_IS_FASTER", {})
    seconds = {"built": 1.0, "later": 2.0}
    timed = []

    def fake(work, like, repeats=5):
        kind = "built" if len(timed) % 2 == 0 else "later"
        work()  # the work itself runs (shapes must fit)
        timed.append((kind, like.shape))
        return seconds[kind]

    monkeypatch.setattr(_sequence, "_seconds", fake)
    return seconds, timed


@pytest.mark.parametrize("built, later, want", [(1.0, 2.0, True), (3.0, 2.0, False)])
def test_the_faster_form_is_kept(fresh, built, later, want):
    seconds, timed = fresh
    seconds.update(built=built, later=later)
    x = torch.randn(4, 6, 5)
    assert _sequence.build_in_backward(x, 7) is want
    assert [kind for kind, _ in timed] == ["built", "later"]


def test_timed_once_per_shape_with_lengths_rounded_to_powers_of_two(fresh):
    _, timed = fresh
    for t in (8, 9, 15, 8):  # one bucket: [8, 16)
        _sequence.build_in_backward(torch.randn(4, t, 5), 7)
    assert len(timed) == 2
    _sequence.build_in_backward(torch.randn(4, 16, 5), 7)  # the next bucket
    _sequence.build_in_backward(torch.randn(4, 8, 5), 3)  # another width
    _sequence.build_in_backward(torch.randn(4, 8, 5, dtype=torch.float64), 7)  # another dtype
    assert len(timed) == 8


def test_wide_layers_are_timed_on_fewer_examples(fresh, monkeypatch):
    _, timed = fresh
    monkeypatch.setattr(_sequence, "TIMING_BUDGET", 2 * 6 * 5 * 7)  # two examples' multiply-adds
    _sequence.build_in_backward(torch.randn(10, 6, 5), 7)
    assert {shape[0] for _, shape in timed} == {2}


def test_timing_leaves_the_random_stream_and_the_graph_alone(monkeypatch):
    monkeypatch.setattr(_sequence, "FORM", "measured")
    monkeypatch.setattr(_sequence, "_BUILD_IS_FASTER", {})
    grad_modes = []
    reduced = _sequence.reduced_pieces

    def watched(a, g, second=False):
        grad_modes.append((torch.is_grad_enabled(), a.requires_grad))
        return reduced(a, g, second)

    monkeypatch.setattr(_sequence, "reduced_pieces", watched)
    x = torch.randn(3, 4, 5, requires_grad=True)
    torch.manual_seed(0)
    want = torch.rand(3)
    torch.manual_seed(0)
    _sequence.build_in_backward(x, 6)
    assert torch.equal(torch.rand(3), want)
    assert x.grad is None and len(_sequence._BUILD_IS_FASTER) == 1
    assert grad_modes and set(grad_modes) == {(False, False)}  # no graph built on the user's input


def test_a_forced_form_is_not_timed(fresh, monkeypatch):
    _, timed = fresh
    monkeypatch.setattr(_sequence, "FORM", "gram")
    assert _sequence.build_in_backward(torch.randn(4, 6, 5), 7) is False
    monkeypatch.setattr(_sequence, "FORM", "materialise")
    assert _sequence.build_in_backward(torch.randn(4, 6, 5), 7) is True
    assert timed == []


@pytest.mark.parametrize("built", [1.0, 3.0], ids=["built-in-backward", "gram"])
@pytest.mark.parametrize("verify", [True, False])
def test_either_measured_choice_gives_the_reference_norms(fresh, built, verify):
    """A sequence model whose Linear layers take whichever form the (faked) timing favours:
    norms and .grad against autograd one example at a time, float64."""
    seconds, _ = fresh
    seconds["built"] = built
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(4, 6, 5, dtype=torch.float64)
    target = torch.randn(4, 6, 3, dtype=torch.float64)
    ref = reference_grads(model, x, target)
    with pergrad.PerExample(model, verify=verify) as pe:
        result = pe.backward(per_example_loss(model(x), target))
    for name, g in ref.items():
        torch.testing.assert_close(result.param_sq_norms[name], g.reshape(4, -1).square().sum(1), rtol=1e-10, atol=0)
        torch.testing.assert_close(model.get_parameter(name).grad, g.mean(0), rtol=1e-10, atol=0)
    assert set(_sequence._BUILD_IS_FASTER.values()) == {built < 2.0}


@pytest.mark.parametrize("reported, want", [("491520K", 64 << 20), ("32768K", 32 << 20), ("2M", 2 << 20)])
def test_caches_are_evicted_with_at_most_64_mib(tmp_path, monkeypatch, reported, want):
    """A cloud VM reports its host's whole last-level cache (480 MiB); filling that before each
    timing made the first step of a small Llama take seconds."""
    (tmp_path / "index0").mkdir()
    (tmp_path / "index0" / "size").write_text("48K\n")
    (tmp_path / "index3").mkdir()
    (tmp_path / "index3" / "size").write_text(reported + "\n")
    monkeypatch.setattr(_sequence, "CPU_CACHES", tmp_path)
    _sequence._evict_bytes.cache_clear()
    try:
        assert _sequence._evict_bytes() == want
    finally:
        _sequence._evict_bytes.cache_clear()
