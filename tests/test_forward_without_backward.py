"""Forward passes that no backward follows, with gradients on (a validation loop without
torch.no_grad): pergrad holds what they saved only as long as their graphs live, as autograd
does, and forward passes whose graphs are alive are measured together by the next backward."""

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

import pergrad
from pergrad import axes


def _held(pe) -> int:
    return sum(len(t.calls) for t in pe._capture.targets)


@pytest.mark.parametrize("verify", [True, False])
def test_a_validation_pass_with_gradients_on_is_not_kept(verify):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    with pergrad.PerExample(model, verify=verify) as pe:
        F.cross_entropy(model(x), y).item()  # one validation batch: its loss is dropped at once
        held = _held(pe)
        for _ in range(20):
            F.cross_entropy(model(torch.randn(8, 6, dtype=torch.float64)), y).item()
        assert _held(pe) == held == 2  # the latest forward's two calls, not 21 forwards' worth
        assert len(axes._STATES) <= 8  # the example axes followed: one forward's (3-4), not 66
        result = pe.backward(F.cross_entropy(model(x), y, reduction="none"))
    for j in range(8):  # autograd on example j alone
        model.zero_grad()
        F.cross_entropy(model(x[j : j + 1]), y[j : j + 1]).backward()
        want = sum(p.grad.square().sum() for p in model.parameters())
        torch.testing.assert_close(result.sq_norms[j], want, rtol=1e-10, atol=0)


def test_two_forwards_then_one_backward_keep_both_while_their_graphs_live():
    """Two views of each example through GPT-2 (whose position table is looked up on the
    direct path: its module's own output is replaced, and only the direct path's hooks hold
    the call), one loss per example: both forwards are measured, against autograd one example
    at a time, without the first-backward check."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=30, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    model = transformers.GPT2LMHeadModel(config).double()
    ids = torch.randint(0, 30, (4, 6))
    ids[:, 0] = 0  # BOS / padding token
    views = [ids, ids.flip(1)]

    def losses(ids_of_view):
        total = 0
        for v in ids_of_view:
            logits = model(input_ids=v).logits[:, :-1]
            total = total + F.cross_entropy(logits.transpose(1, 2), v[:, 1:], reduction="none").mean(1)
        return total

    want = []
    for j in range(4):
        model.zero_grad()
        losses([v[j : j + 1] for v in views])[0].backward()
        want.append(sum(p.grad.square().sum() for p in model.parameters() if p.grad is not None))
    model.zero_grad()
    with pergrad.PerExample(model, verify=False) as pe:
        result = pe.backward(losses(views))
    torch.testing.assert_close(result.sq_norms, torch.stack(want), rtol=1e-10, atol=0)
