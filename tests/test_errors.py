"""Bad input gives a clear error, raised before anything is written into .grad."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pergrad
from pergrad.rules import Dense, _registry
from reference import per_example_loss


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def _no_grads(model):
    return all(p.grad is None for p in model.parameters())


class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(4, dtype=torch.float64))

    def forward(self, x):
        return x * self.w


class ScaleRule(pergrad.Rule):
    def records(self, module, calls):
        return {"w": [Dense(c.args[0] * c.grad_outputs[0]) for c in calls]}


@pytest.mark.parametrize(
    "make_losses, message",
    [
        (lambda out: per_example_loss(out, 0 * out).mean(), "scalar"),
        (lambda out: out, "shape"),
        (lambda out: per_example_loss(out, 0 * out).detach(), "no graph"),
        (lambda out: per_example_loss(out, 0 * out) * torch.tensor([1, float("nan"), 1, 1]), "NaN"),
        (lambda out: per_example_loss(out, 0 * out)[:3], "batch of 4"),
    ],
    ids=["scalar", "2-d", "no-graph", "nan", "wrong-n"],
)
def test_bad_losses_are_refused_before_grad_is_touched(make_losses, message):
    model = _mlp()
    with pergrad.PerExample(model) as pe:
        with pytest.raises((ValueError, pergrad.CaptureError), match=message):
            pe.backward(make_losses(model(torch.randn(4, 3, dtype=torch.float64))))
    assert _no_grads(model)


def test_unknown_reduction():
    model = _mlp()
    with pergrad.PerExample(model) as pe:
        with pytest.raises(ValueError, match="'mean' or 'sum'"):
            pe.backward(per_example_loss(model(torch.randn(4, 3, dtype=torch.float64)), 0), "avg")


def test_unsupported_layer_names_path_class_and_fixes():
    model = nn.Sequential(nn.Linear(4, 4), Scale())
    with pytest.raises(pergrad.UnsupportedModuleError) as err:
        pergrad.PerExample(model, on_unsupported="error")
    text = str(err.value)
    assert "Scale at '1'" in text and "register_rule" in text and "'auto'" in text


def test_on_unsupported_value_is_checked():
    with pytest.raises(ValueError, match="on_unsupported"):
        pergrad.PerExample(_mlp(), on_unsupported="ignore")


def test_frozen_unsupported_layer_is_fine():
    model = nn.Sequential(nn.Linear(4, 4), Scale()).double()
    model[1].w.requires_grad_(False)
    with pergrad.PerExample(model) as pe:
        result = pe.backward(per_example_loss(model(torch.randn(3, 4, dtype=torch.float64)), 0))
    assert list(result.param_sq_norms) == ["0.weight", "0.bias"]


def test_register_rule_adds_a_user_layer(monkeypatch):
    monkeypatch.setattr(_registry, "_RULES", dict(_registry._RULES))
    pergrad.register_rule(Scale, ScaleRule())
    with pytest.raises(ValueError, match="already has a rule"):
        pergrad.register_rule(Scale, ScaleRule())
    pergrad.register_rule(Scale, ScaleRule(), overwrite=True)
    model = nn.Sequential(nn.Linear(4, 4), Scale()).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    with pergrad.PerExample(model, grads=True) as pe:
        result = pe.backward(per_example_loss(model(x), 0))
    torch.testing.assert_close(result.grads["1.w"].mean(0), model[1].w.grad)


def test_register_rule_checks_its_arguments():
    with pytest.raises(TypeError, match="nn.Module subclass"):
        pergrad.register_rule(int, ScaleRule())
    with pytest.raises(TypeError, match="pergrad.rules.Rule"):
        pergrad.register_rule(Scale, object())


@pytest.mark.parametrize(
    "layer, x",
    [
        (nn.BatchNorm1d(3), torch.randn(4, 3)),
        (nn.BatchNorm2d(3), torch.randn(4, 3, 2, 2)),
        (nn.BatchNorm1d(3, track_running_stats=False).eval(), torch.randn(4, 3)),
    ],
    ids=["bn1d-train", "bn2d-train", "bn-no-running-stats"],
)
def test_batchnorm_that_mixes_examples_is_refused(layer, x):
    model = nn.Sequential(layer, nn.Flatten(), nn.LazyLinear(2)).double()
    model(x.double())
    with pergrad.PerExample(model) as pe:
        with pytest.raises(pergrad.ExampleCouplingError, match="mixes examples.*GroupNorm"):
            pe.backward(per_example_loss(model(x.double()), 0))
    assert _no_grads(model)


def test_coupling_embedding_and_attention_dropout_are_refused():
    emb = nn.Embedding(5, 2, scale_grad_by_freq=True)
    with pergrad.PerExample(emb) as pe:
        with pytest.raises(pergrad.ExampleCouplingError, match="scale_grad_by_freq"):
            pe.backward(per_example_loss(emb(torch.tensor([[1, 1], [2, 3]])), 0))
    attn = nn.MultiheadAttention(4, 2, dropout=0.1, batch_first=True)
    with pergrad.PerExample(attn) as pe:
        x = torch.randn(2, 3, 4)
        with pytest.raises(pergrad.ExampleCouplingError, match="dropout"):
            pe.backward(per_example_loss(attn(x, x, x)[0], 0))


def test_fallback_refuses_random_draws():
    class Noisy(Scale):
        def forward(self, x):
            return nn.functional.dropout(x * self.w, 0.5, training=True)

    model = Noisy()
    with pergrad.PerExample(model, on_unsupported="fallback") as pe:
        with pytest.raises(RuntimeError, match="random numbers"):
            pe.backward(per_example_loss(model(torch.randn(3, 4, dtype=torch.float64)), 0))


def test_backward_twice_without_forward():
    model = _mlp()
    x = torch.randn(4, 3, dtype=torch.float64)
    with pergrad.PerExample(model) as pe:
        losses = per_example_loss(model(x), 0)
        pe.backward(losses.clone())
        grads = [p.grad.clone() for p in model.parameters()]
        with pytest.raises(pergrad.CaptureError, match="No forward pass was captured"):
            pe.backward(losses)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))


def test_grad_accumulates_like_autograd_and_hooks_go_on_exit():
    model = _mlp()
    x = torch.randn(4, 3, dtype=torch.float64)
    per_example_loss(model(x), 0).mean().backward()
    expected = [2 * p.grad for p in model.parameters()]
    with pergrad.PerExample(model) as pe:
        result = pe.backward(per_example_loss(model(x), 0))
    for e, p in zip(expected, model.parameters()):
        torch.testing.assert_close(p.grad, e)
    fresh = sum(g.square().sum() for g in expected) / 4
    torch.testing.assert_close(result.batch_grad_sq_norm, fresh)
    assert all(not m._forward_hooks for m in model.modules())


def test_unbatched_attention_input_is_refused():
    attn = nn.MultiheadAttention(4, 2)
    x = torch.randn(3, 4)
    with pergrad.PerExample(attn) as pe:
        out = attn(x, x, x)[0]
        with pytest.raises(ValueError, match="unbatched"):
            pe.backward(per_example_loss(out, 0))


def test_attention_internals_come_from_the_forward_and_copies_are_unhooked():
    """Calls that return no attention weights expose q, k, v and o from the model's own forward
    (no recomputation); a deep copy of a hooked model computes with its own weights."""
    import copy

    from cases import Attention

    torch.manual_seed(0)
    model = Attention(True, causal=True).double()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    with pergrad.PerExample(model) as pe:
        out = model(x)
        (call,) = pe._capture.targets[0].calls
        assert set(call.internals) == {"q", "k", "v", "o"}
        twin = copy.deepcopy(model)
        with torch.no_grad():
            twin.attn.out_proj.weight.mul_(2)
        assert not torch.allclose(twin(x), out)
        pe.backward(out.square().sum((1, 2)))
        assert set(call.internal_grads) == {"q", "k", "v"}
    assert "forward" not in model.attn.__dict__


def test_linear_pieces_built_in_chunks_match_the_reference(monkeypatch):
    """The Linear weight's pieces, built in the backward in chunks of one example, give the
    reference norms and second moments, and the .grad of a plain backward."""
    from pergrad.rules import _sequence
    from reference import reference_grads

    monkeypatch.setattr(_sequence, "CHUNK_ELEMENTS", 1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(5, 7, 3, dtype=torch.float64), torch.randn(5, 7, 2, dtype=torch.float64)
    reference = reference_grads(model, x, y)
    model.zero_grad()
    per_example_loss(model(x), y).mean().backward()
    plain = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    with pergrad.PerExample(model, second_moment=True) as pe:
        result = pe.backward(per_example_loss(model(x), y))
    for name, p in model.named_parameters():
        expected = reference[name].flatten(1).square().sum(1)
        assert torch.allclose(result.param_sq_norms[name], expected, rtol=1e-10, atol=0)
        assert torch.allclose(result.second_moment[name], reference[name].square().sum(0), rtol=1e-10, atol=0)
        assert torch.allclose(p.grad, plain[name], rtol=1e-10, atol=1e-14)


def test_a_parameter_unfrozen_after_attaching_is_named_before_any_gradient():
    """Gradual unfreezing: a parameter frozen when PerExample was created and trainable now has
    no hooks and no rule behind it. Before: a KeyError from deep inside the records."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    model[0].weight.requires_grad_(False)
    with pergrad.PerExample(model) as pe:
        pe.backward(F.cross_entropy(model(x), y, reduction="none"))
        model.zero_grad(set_to_none=True)
        model[0].weight.requires_grad_(True)
        with pytest.raises(pergrad.CaptureError, match=r"'0\.weight' was frozen when PerExample was created"):
            pe.backward(F.cross_entropy(model(x), y, reduction="none"))
        assert all(p.grad is None for p in model.parameters())  # raised before the backward
        with pytest.raises(pergrad.CaptureError, match=r"'0\.weight' was frozen"):  # a backward run by someone else
            F.cross_entropy(model(x), y).backward()


@pytest.mark.parametrize("verify", [True, False])
def test_a_module_put_into_the_model_after_attaching_is_named_not_left_out(verify):
    """A new head after PerExample was created (fine-tuning on new classes) has no hooks. Before:
    its per-example gradients were silently left out of sq_norms, and the old head's read as zeros."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    with pergrad.PerExample(model, verify=verify) as pe:
        pe.backward(F.cross_entropy(model(x), y, reduction="none"))
        model[0].weight = model[0].weight  # the same parameter again (as tie_weights() does): fine
        model[1] = nn.Tanh()  # a module without parameters: fine
        pe.backward(F.cross_entropy(model(x), y, reduction="none"))
        model.zero_grad(set_to_none=True)
        model[2] = nn.Linear(8, 3).double()
        with pytest.raises(pergrad.CaptureError, match=r"'2' has trainable parameters that pergrad does not hook"):
            pe.backward(F.cross_entropy(model(x), y, reduction="none"))
        assert all(p.grad is None for p in model.parameters())
    with pergrad.PerExample(model, verify=verify) as pe:  # created again: measured, new head included
        result = pe.backward(F.cross_entropy(model(x), y, reduction="none"))
    for j in range(5):
        model.zero_grad()
        F.cross_entropy(model(x[j : j + 1]), y[j : j + 1]).backward()
        want = sum(p.grad.square().sum() for p in model.parameters())
        torch.testing.assert_close(result.sq_norms[j], want, rtol=1e-10, atol=0)


def test_a_new_parameter_on_a_module_of_the_model_is_named():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    with pergrad.PerExample(model) as pe:
        model[0].weight = nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
        with pytest.raises(pergrad.CaptureError, match=r"'0\.weight' has trainable parameters"):
            pe.backward(model(x).square().sum(1))
