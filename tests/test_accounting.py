"""Every use of every parameter is accounted for exactly once, with or without the first-backward
check, and tied weights never build an (n, V, d) tensor in norms mode."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pergrad
from memory import LargestTensor
from cases import ALL_CASES, ScaledTiedLM, TiedNoPadding, _tokens_with_zero, build
from pergrad.rules import Rule, _registry
from reference import per_example_loss, reference_grads, rel_err


@pytest.mark.parametrize("case", ALL_CASES, ids=str)
def test_no_parameter_reads_zero_while_its_batch_gradient_is_not(case):
    """Unchecked (verify=False): a parameter whose batch gradient is non-zero has per-example
    gradients that are not all zero (the failure the direct path had on _VF.lstm and bags)."""
    model = build(case)
    x = case.make_input(4, torch.Generator().manual_seed(3))
    with pergrad.PerExample(model, on_unsupported=case.on_unsupported, verify=False) as pe:
        result = pe.backward(per_example_loss(model(x), torch.zeros(())))
    for name, p in model.named_parameters():
        if p.requires_grad and p.grad.abs().max() > 0:
            assert result.param_sq_norms[name].max() > 0, name


class HeadOnTheEmbedding(nn.Module):
    """A parent without parameters of its own that uses its child's table as the output head:
    a use of ``emb.weight`` that no module owning it runs."""

    def __init__(self, vocab=11, d=6):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, idx):
        return torch.tanh(self.norm(self.emb(idx))) @ self.emb.weight.T


@pytest.mark.parametrize("verify", ["first", False])
def test_a_use_no_rule_sees_is_refused_with_or_without_verification(verify):
    model = HeadOnTheEmbedding().double()
    x = _tokens_with_zero(11, 6)(4, torch.Generator().manual_seed(0))
    with pergrad.PerExample(model, verify=verify) as pe:
        with pytest.raises(pergrad.VerificationError, match=r"'emb.weight' \(Embedding at 'emb'"):
            pe.backward(per_example_loss(model(x), torch.zeros(())))


class Silent(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, 4, dtype=torch.float64))

    def forward(self, x):
        return x * self.w


class NoRecordsRule(Rule):
    """A rule that forgets a parameter: it returns no record for it."""

    def records(self, module, calls):
        return {}


@pytest.mark.parametrize("verify", ["first", False])
def test_a_parameter_with_a_gradient_and_no_records_is_an_error_not_zeros(verify, monkeypatch):
    monkeypatch.setitem(_registry._RULES, Silent, NoRecordsRule())
    model = nn.Sequential(nn.Linear(4, 4), Silent()).double()
    with pergrad.PerExample(model, verify=verify) as pe:
        with pytest.raises(pergrad.CaptureError, match=r"'1.w' \(Silent at '1'\) received a gradient"):
            pe.backward(per_example_loss(model(torch.randn(3, 4, dtype=torch.float64)), torch.zeros(())))


class OwnLSTM(nn.LSTM):
    """An LSTM subclass with a forward of its own (no inherited rule): its weights reach
    ``_VF.lstm`` in a list, which the direct path cannot follow."""

    def forward(self, x):
        return super().forward(x)[0]


@pytest.mark.parametrize("verify", ["first", False])
def test_parameters_passed_in_a_list_go_through_torch_func(verify):
    torch.manual_seed(0)
    model = nn.Sequential(OwnLSTM(3, 4, batch_first=True), nn.Linear(4, 2)).double()
    x = torch.randn(3, 5, 3, dtype=torch.float64)
    target = torch.zeros(3, 5, 2, dtype=torch.float64)
    want = reference_grads(model, x, target)
    with pergrad.PerExample(model, grads=True, verify=verify) as pe:
        result = pe.backward(per_example_loss(model(x), target))
    assert pe.paths["0"].startswith("torch.func (") and "passed in a list" in pe.paths["0"]
    for name, w in want.items():
        assert rel_err(result.grads[name], w) <= 1e-10, name


@pytest.mark.parametrize("model_class", [TiedNoPadding, ScaledTiedLM], ids=["rules", "direct-embedding"])
def test_tied_embedding_norms_build_no_per_example_table(model_class, monkeypatch):
    """Norms mode (with second moments off) on an embedding tied to the head: no operation of the
    backward returns n·V·d elements, more than the logits; the cross term between the lookup rows
    and the head's outer products is exact. With gradients asked for, the table is built.
    (Pieces materialised to be squared come one example at a time here, V·d elements.)"""
    from pergrad.rules import _sequence

    n, t = 8, 4
    torch.manual_seed(0)
    model = model_class().double()
    vocab, d = model.emb.weight.shape
    x = _tokens_with_zero(vocab, t)(n, torch.Generator().manual_seed(1))
    target = torch.zeros(n, t, vocab, dtype=torch.float64)
    table = n * vocab * d
    monkeypatch.setattr(_sequence, "CHUNK_ELEMENTS", vocab * d)
    assert table > n * t * vocab  # more than the logits
    want = reference_grads(model, x, target)["emb.weight"].reshape(n, -1).square().sum(1)
    seen = {}
    for grads in (False, True):
        with pergrad.PerExample(model, grads=grads, verify=False) as pe:
            losses = per_example_loss(model(x), target)
            with LargestTensor() as probe:
                result = pe.backward(losses)
        seen[grads] = probe.largest
        assert rel_err(result.param_sq_norms["emb.weight"], want) <= 1e-10
    assert seen[False] < table
    assert seen[True] >= table


class SequenceBias(nn.Module):
    """Opacus's ``SequenceBias``: appends a learned step to a sequence-first batch (t, n, d)."""

    def __init__(self, d):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return torch.cat([x, self.bias.repeat(1, x.shape[1], 1)])


class WithSequenceBias(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.extend = nn.Linear(4, 4), SequenceBias(4)

    def forward(self, x):  # (n, t, 4), sequence-first inside
        return self.extend(self.lin(x).transpose(0, 1)).transpose(0, 1)


@pytest.mark.parametrize("t", [3, 5, 6], ids=["t-equals-n", "t-not-n", "t-multiple-of-n"])
@pytest.mark.parametrize("verify", ["first", False])
def test_a_parameter_joined_to_a_sequence_first_batch_gets_its_examples(t, verify):
    """Opacus's SequenceBias: the bias repeated along the batch axis (axis 1 of (t, n, d)) and
    joined to it lines each example up with its own copy, wherever t and n fall."""
    torch.manual_seed(0)
    model = WithSequenceBias().double()
    x = torch.randn(3, t, 4, dtype=torch.float64)
    target = torch.zeros(3, t + 1, 4, dtype=torch.float64)
    want = reference_grads(model, x, target)
    with pergrad.PerExample(model, grads=True, verify=verify) as pe:
        grads = pe.backward(per_example_loss(model(x), target)).grads
    assert pe.paths["extend"] == "direct (cat)"
    for name, w in want.items():
        torch.testing.assert_close(grads[name], w, rtol=1e-10, atol=1e-12)
