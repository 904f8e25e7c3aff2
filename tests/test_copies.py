"""Copies of a hooked model: ``copy.deepcopy`` (an EMA or teacher model, a best-so-far snapshot,
``torch.optim.swa_utils.AveragedModel``) and ``torch.save`` of the whole model, made while a
PerExample is attached. A copy runs as a plain model: it captures nothing, holds nothing of
the capture's, and pickles."""

import copy
import gc
import io
import weakref

import torch
from torch import nn

import pergrad
from reference import per_example_loss, reference_grads


class _Net(nn.Module):
    """Linear layers (hooked) around a MultiheadAttention (its rule replaces its forward)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        return self.out(self.attn(h, h, h, need_weights=False)[0])


def _model_and_batch():
    torch.manual_seed(0)
    model = _Net().double()
    return model, torch.randn(4, 5, 3, dtype=torch.float64), torch.randn(4, 5, 2, dtype=torch.float64)


def _unhooked_grads(model, x, target):
    twin = _Net().double()
    twin.load_state_dict(model.state_dict())
    per_example_loss(twin(x), target).mean().backward()
    return {k: p.grad for k, p in twin.named_parameters()}


def test_a_deep_copy_made_while_attached_trains_as_a_plain_model():
    model, x, target = _model_and_batch()
    want = reference_grads(model, x, target)
    with pergrad.PerExample(model) as pe:
        ema = torch.optim.swa_utils.AveragedModel(model)  # deep-copies the model
        snapshot = copy.deepcopy(model)
        out = snapshot(x)
        assert all(not t.calls for t in pe._capture.targets)  # the copy's calls are not captured
        per_example_loss(out, target).mean().backward()  # a plain backward of the copy
        result = pe.backward(per_example_loss(model(x), target))
        ema.update_parameters(model)
    plain = _unhooked_grads(model, x, target)
    for name, p in snapshot.named_parameters():
        torch.testing.assert_close(p.grad, plain[name], rtol=1e-12, atol=0)
    for name, g in want.items():  # the original is measured as before
        torch.testing.assert_close(result.param_sq_norms[name], g.reshape(4, -1).square().sum(1), rtol=1e-10, atol=0)
    assert torch.allclose(ema(x), model(x))


def test_a_copy_outlives_the_capture_without_holding_it():
    """Before: the copy kept the capture's hooks, each forward of it with gradients stored its
    activations in the (removed) capture, and the capture stayed alive as long as the copy."""
    model, x, target = _model_and_batch()
    pe = pergrad.PerExample(model)
    snapshot = copy.deepcopy(model)
    capture = weakref.ref(pe._capture)
    pe.remove()
    for _ in range(3):
        snapshot(x).sum().backward()
    del pe, model
    gc.collect()
    assert capture() is None


def test_the_whole_model_saved_while_attached_loads_as_a_plain_model():
    """torch.save(model) pickles the module's hooks and forward: it raised a PicklingError."""
    model, x, target = _model_and_batch()
    buffer = io.BytesIO()
    with pergrad.PerExample(model) as pe:
        torch.save(model, buffer)
        result = pe.backward(per_example_loss(model(x), target))
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert "forward" not in loaded.attn.__dict__ or loaded.attn.forward.__func__ is nn.MultiheadAttention.forward
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    with pergrad.PerExample(loaded) as pe:  # and can be measured in turn
        again = pe.backward(per_example_loss(loaded(x), target))
    torch.testing.assert_close(again.sq_norms, result.sq_norms, rtol=1e-12, atol=0)
