"""nn.RNN, nn.LSTM, nn.GRU (RecurrentRule), float64, against an independent reference: an
unhooked deep copy of the model differentiated by autograd one example at a time (each
example's own loss alone, on a batch of one in the module's own layout)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import pergrad
from pergrad.errors import CaptureError, ExampleCouplingError

I, H, O, T, Z = 3, 4, 2, 4, 5  # input features, hidden size, head outputs, time steps, features of z
TOL = 1e-10


class Recurrent(nn.Module):
    """A recurrent layer with a Linear head on its output. The model takes x (n, t, i), examples
    first as pergrad expects of a model's input, and feeds the layer in its own layout.

    ``init``: h0 computed per example from features z by a Linear (and, for LSTM, c0 given as
    data). ``keywords``: the layer called by keyword. Returns the head's output (n, t, O) and
    the final states, batch-first: [h_n] or [h_n, c_n], each (n, layers·directions, ·).
    """

    def __init__(self, cls, batch_first, init=False, keywords=False, **options):
        super().__init__()
        self.rnn = cls(I, H, batch_first=batch_first, **options)
        self.keywords = keywords
        self.states = self.rnn.num_layers * (2 if self.rnn.bidirectional else 1)
        self.h_out = options.get("proj_size") or H
        self.head = nn.Linear((2 if self.rnn.bidirectional else 1) * self.h_out, O)
        self.init = nn.Linear(Z, self.states * self.h_out) if init else None

    def forward(self, x, z=None, c0=None):
        hx = None
        x = x if self.rnn.batch_first else x.transpose(0, 1)
        if self.init is not None:
            h0 = torch.tanh(self.init(z)).reshape(len(z), self.states, self.h_out).transpose(0, 1)
            hx = (h0, c0) if isinstance(self.rnn, nn.LSTM) else h0
        if self.keywords:
            out, state = self.rnn(input=x, hx=hx)
        else:
            out, state = self.rnn(x) if hx is None else self.rnn(x, hx)
        out = out if self.rnn.batch_first else out.transpose(0, 1)
        states = state if isinstance(state, tuple) else (state,)
        return self.head(out), [s.transpose(0, 1) for s in states]


class CalledTwice(nn.Module):
    """One GRU as encoder and decoder: its weights shared across two calls in one forward."""

    def __init__(self, batch_first):
        super().__init__()
        self.rnn = nn.GRU(I, H, batch_first=batch_first)
        self.head = nn.Linear(H, O)

    def forward(self, x, z=None, c0=None):
        x = x if self.rnn.batch_first else x.transpose(0, 1)
        _, h = self.rnn(x)
        out, h2 = self.rnn(x.flip(1 if self.rnn.batch_first else 0), h)
        out = out if self.rnn.batch_first else out.transpose(0, 1)
        return self.head(out), [h2.transpose(0, 1)]


@dataclass(frozen=True)
class Case:
    name: str
    cls: type
    batch_first: bool
    options: dict = field(default_factory=dict)
    init: bool = False  # h0 from a Linear of per-example features (and c0 given, for LSTM)
    through: str = "output"  # what the loss uses: "output", "h_n", "c_n" or "all"
    keywords: bool = False
    frozen: str | None = None  # a recurrent weight with requires_grad=False
    twice: bool = False

    def __str__(self):
        return self.name

    def model(self) -> nn.Module:
        torch.manual_seed(0)
        if self.twice:
            model = CalledTwice(self.batch_first)
        else:
            model = Recurrent(self.cls, self.batch_first, self.init, self.keywords, **self.options)
        if self.frozen:
            model.rnn.get_parameter(self.frozen).requires_grad_(False)
        return model.double()


def _loss(case: Case, model, x, z, c0, target):
    """(n,): each example's own loss, from the head's output and/or the final states."""
    y, states = model(x, z, c0)
    n = y.shape[0]
    losses = y.new_zeros(n)
    if case.through in ("output", "all"):
        losses = losses + 0.5 * (y - target).reshape(n, -1).square().sum(1)
    if case.through in ("h_n", "all"):
        losses = losses + torch.sin(states[0]).reshape(n, -1).sum(1) * 1.5
    if case.through in ("c_n", "all"):
        losses = losses + states[-1].reshape(n, -1).square().sum(1)
    return losses


def _inputs(case: Case, model, n: int):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, T, I, generator=gen, dtype=torch.float64)
    z = torch.randn(n, Z, generator=gen, dtype=torch.float64)
    c0 = None
    if case.init and case.cls is nn.LSTM:
        c0 = torch.randn(model.states, n, H, generator=gen, dtype=torch.float64)
    target = torch.randn(n, T, O, generator=gen, dtype=torch.float64)
    return x, z, c0, target


def _reference(case: Case, model, x, z, c0, target) -> dict[str, torch.Tensor]:
    """{name: (n, *p.shape)}: autograd on an unhooked copy, one example (batch of one) at a time."""
    model = copy.deepcopy(model)
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    n = len(z)
    grads = {k: [] for k in params}
    for j in range(n):
        cj = None if c0 is None else c0[:, j : j + 1]
        (loss,) = _loss(case, model, x[j : j + 1], z[j : j + 1], cj, target[j : j + 1])
        got = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (k, p), g in zip(params.items(), got):
            grads[k].append(torch.zeros_like(p) if g is None else g)
    return {k: torch.stack(v) for k, v in grads.items()}


def _close(actual, expected, what):
    scale = expected.abs().max().clamp_min(1e-300)
    err = ((actual - expected).abs().max() / scale).item()
    assert err <= TOL, f"{what}: relative error {err:.3g}"


def _check(case: Case, n: int):
    model = case.model()
    x, z, c0, target = _inputs(case, model, n)
    want = _reference(case, model, x, z, c0, target)
    for verify in (False, "first"):
        with pergrad.PerExample(model, grads=True, verify=verify) as pe:
            model.zero_grad()
            result = pe.backward(_loss(case, model, x, z, c0, target))
        assert pe.paths["rnn"] == "rule RecurrentRule"
        assert set(result.grads) == set(want)
        for name, w in want.items():
            _close(result.grads[name], w, f"grads[{name}] verify={verify}")
            grad = model.get_parameter(name).grad  # None where the loss does not use it (the head)
            _close(torch.zeros_like(w[0]) if grad is None else grad, w.mean(0), f".grad of {name}")
        with pergrad.PerExample(model, second_moment=True, verify=verify) as pe:
            result = pe.backward(_loss(case, model, x, z, c0, target))
        for name, w in want.items():
            _close(result.param_sq_norms[name], w.reshape(n, -1).square().sum(1), f"sq_norms[{name}] verify={verify}")
            _close(result.second_moment[name], w.square().sum(0), f"second_moment[{name}] verify={verify}")


CELLS = [(nn.RNN, "rnn"), (nn.LSTM, "lstm"), (nn.GRU, "gru")]
GRID = [
    Case(f"{tag}-{'batch-first' if bf else 'seq-first'}-{shape}", cls, bf, options)
    for cls, tag in CELLS
    for bf in (True, False)
    for shape, options in (("1-layer", {}), ("2-layers-bidir", {"num_layers": 2, "bidirectional": True}))
]
EXTRA = [
    Case("lstm-h0-c0-given", nn.LSTM, True, {"num_layers": 2}, init=True, through="all"),
    Case("lstm-h0-c0-given-seq-first-bidir", nn.LSTM, False, {"bidirectional": True}, init=True),
    Case("gru-h0-given-keywords", nn.GRU, False, {"num_layers": 2}, init=True, keywords=True),
    Case("rnn-relu-h0-given", nn.RNN, True, {"nonlinearity": "relu"}, init=True, through="all"),
    Case("rnn-loss-h_n-only-bidir", nn.RNN, False, {"num_layers": 2, "bidirectional": True}, through="h_n"),
    Case("gru-loss-h_n-only", nn.GRU, True, {}, through="h_n"),
    Case("lstm-loss-c_n-only", nn.LSTM, False, {"num_layers": 2}, through="c_n"),
    Case("lstm-proj", nn.LSTM, True, {"proj_size": 2}, through="all"),
    Case(
        "lstm-proj-2-layers-bidir-seq-first",
        nn.LSTM,
        False,
        {"proj_size": 3, "num_layers": 2, "bidirectional": True},
        init=True,
        through="all",
    ),
    Case("lstm-no-bias-bidir", nn.LSTM, True, {"bias": False, "bidirectional": True}),
    Case("gru-no-bias-2-layers", nn.GRU, False, {"bias": False, "num_layers": 2}, through="all"),
    Case("lstm-frozen-weight", nn.LSTM, True, {"num_layers": 2}, through="all", frozen="weight_hh_l0"),
    Case("gru-called-twice", nn.GRU, False, twice=True),
]


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("case", GRID + EXTRA, ids=str)
def test_matches_autograd_one_example_at_a_time(case, n):
    _check(case, n)


class Classifier(nn.Module):
    def __init__(self, cls=nn.LSTM):
        super().__init__()
        self.rnn = cls(I, H, batch_first=True, num_layers=2, dropout=0.5)
        self.head = nn.Linear(H, 3)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_per_example_cross_entropy(reduction):
    """losses = F.cross_entropy(..., reduction='none'), shape (n,), and pe.backward(losses)."""
    torch.manual_seed(1)
    model = Classifier().double().eval()  # eval: the inter-layer dropout is off
    x, y = torch.randn(6, T, I, dtype=torch.float64), torch.randint(0, 3, (6,))
    reference = copy.deepcopy(model)
    want = {k: [] for k, _ in model.named_parameters()}
    for j in range(6):
        loss = F.cross_entropy(reference(x[j : j + 1]), y[j : j + 1], reduction="none")[0]
        for k, g in zip(want, torch.autograd.grad(loss, list(reference.parameters()))):
            want[k].append(g)
    with pergrad.PerExample(model, grads=True, second_moment=True) as pe:
        losses = F.cross_entropy(model(x), y, reduction="none")
        assert losses.shape == (6,)
        result = pe.backward(losses, reduction=reduction)
    assert pe.paths == {"rnn": "rule RecurrentRule", "head": "rule LinearRule"}
    for name, w in want.items():
        w = torch.stack(w)
        _close(result.grads[name], w, name)
        _close(result.param_sq_norms[name], w.reshape(6, -1).square().sum(1), name)
        _close(result.second_moment[name], w.square().sum(0), name)
        _close(model.get_parameter(name).grad, w.mean(0) if reduction == "mean" else w.sum(0), name)


def test_backward_run_by_someone_else():
    """loss.backward() on the batch's mean loss, the result read afterwards."""
    torch.manual_seed(2)
    model = Classifier(nn.GRU).double().eval()
    x, y = torch.randn(4, T, I, dtype=torch.float64), torch.randint(0, 3, (4,))
    want = {}
    reference = copy.deepcopy(model)
    for j in range(4):
        loss = F.cross_entropy(reference(x[j : j + 1]), y[j : j + 1])
        for (k, _), g in zip(reference.named_parameters(), torch.autograd.grad(loss, list(reference.parameters()))):
            want.setdefault(k, []).append(g.reshape(-1).square().sum())
    pe = pergrad.PerExample(model)
    try:
        F.cross_entropy(model(x), y).backward()
        result = pe.result()
    finally:
        pe.remove()
    for name, w in want.items():
        _close(result.param_sq_norms[name], torch.stack(w), name)


def test_packed_sequence_is_refused_with_advice():
    torch.manual_seed(3)
    lstm, head = nn.LSTM(I, H, batch_first=True).double(), nn.Linear(H, O).double()
    model = nn.ModuleDict({"rnn": lstm, "head": head})
    x = torch.randn(3, T, I, dtype=torch.float64)
    with pergrad.PerExample(model) as pe:
        packed = pack_padded_sequence(x, torch.tensor([4, 2, 3]), batch_first=True, enforce_sorted=False)
        out, _ = pad_packed_sequence(lstm(packed)[0], batch_first=True)
        losses = head(out).square().sum((1, 2))
        with pytest.raises(CaptureError, match="PackedSequence") as err:
            pe.backward(losses)
    assert "pad" in str(err.value) and "mask" in str(err.value)
    assert all(p.grad is None for p in model.parameters()), "raised before anything reached .grad"


def test_unbatched_input_is_refused():
    torch.manual_seed(4)
    model = nn.GRU(I, H).double()
    with pergrad.PerExample(model, batch_first=False) as pe:
        out, _ = model(torch.randn(T, I, dtype=torch.float64))  # (t, i): no example axis
        with pytest.raises(CaptureError, match="batch of examples"):
            pe.backward(out.square().sum().reshape(1))


def test_dropout_between_layers_in_training_is_refused():
    torch.manual_seed(5)
    model = Classifier().double().train()
    x = torch.randn(3, T, I, dtype=torch.float64)
    with pergrad.PerExample(model) as pe:
        with pytest.raises(ExampleCouplingError, match=r"LSTM at 'rnn'.*dropout=0.5.*\.eval\(\)"):
            pe.backward(model(x).square().sum(1))
    assert all(p.grad is None for p in model.parameters()), "raised before anything reached .grad"


@pytest.mark.parametrize("n", [1, 3])
def test_bare_module_fed_sequence_first(n):
    """The LSTM itself is the model, fed (t, n, i); the loss uses output, h_n and c_n."""
    torch.manual_seed(6)
    model = nn.LSTM(I, H, num_layers=2, bidirectional=True).double()
    x = torch.randn(T, n, I, dtype=torch.float64)

    def losses(out, h, c):  # out (t, n, 2H), h and c (4, n, H) -> (n,)
        return out.square().sum((0, 2)) + torch.sin(h).sum((0, 2)) + (c * h).sum((0, 2))

    reference = copy.deepcopy(model)
    want = {k: [] for k, _ in model.named_parameters()}
    for j in range(n):
        out, (h, c) = reference(x[:, j : j + 1])
        for k, g in zip(want, torch.autograd.grad(losses(out, h, c)[0], list(reference.parameters()))):
            want[k].append(g)
    for verify in (False, "first"):
        with pergrad.PerExample(model, grads=True, second_moment=True, verify=verify, batch_first=False) as pe:
            out, (h, c) = model(x)
            result = pe.backward(losses(out, h, c))
        assert pe.paths == {"<model>": "rule RecurrentRule"}
        for name, w in want.items():
            w = torch.stack(w)
            _close(result.grads[name], w, name)
            _close(result.param_sq_norms[name], w.reshape(n, -1).square().sum(1), name)
            _close(result.second_moment[name], w.square().sum(0), name)


@pytest.mark.parametrize("cls", [nn.RNN, nn.LSTM, nn.GRU], ids=lambda c: c.__name__)
def test_float32_on_cpu(cls):
    """float32 LSTM on CPU runs oneDNN's kernel, which vmap cannot differentiate per example:
    the rule recomputes with oneDNN off (and puts the setting back)."""
    torch.manual_seed(7)
    model = cls(I, 8, num_layers=2, bidirectional=True, batch_first=True)
    x = torch.randn(3, T, I)
    reference = copy.deepcopy(model)
    want = []
    for j in range(3):
        out, _ = reference(x[j : j + 1])
        grads = torch.autograd.grad(out.square().sum(), list(reference.parameters()))
        want.append(sum(g.square().sum() for g in grads))
    enabled = torch.backends.mkldnn.enabled
    with pergrad.PerExample(model) as pe:
        out, _ = model(x)
        result = pe.backward(out.square().sum((1, 2)))
    assert torch.backends.mkldnn.enabled == enabled
    torch.testing.assert_close(result.sq_norms, torch.stack(want), rtol=1e-4, atol=0)


def test_sequence_first_single_time_step():
    case = Case("gru-seq-first-one-step", nn.GRU, False)
    model = case.model()
    x = torch.randn(3, 1, I, dtype=torch.float64)  # (n, t=1, i), fed to the GRU as (1, n, i)
    target = torch.randn(3, 1, O, dtype=torch.float64)
    want = _reference(case, model, x, torch.zeros(3, Z, dtype=torch.float64), None, target)
    with pergrad.PerExample(model, verify=False) as pe:
        y, states = model(x)
        assert y.shape == (3, 1, O) and states[0].shape == (3, 1, H), "the model's outputs keep their shapes"
        result = pe.backward(0.5 * (y - target).reshape(3, -1).square().sum(1))
    for name, w in want.items():
        _close(result.param_sq_norms[name], w.reshape(3, -1).square().sum(1), name)
