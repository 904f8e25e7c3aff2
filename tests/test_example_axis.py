"""Where the examples are is followed, never guessed: sequence-first layers and models, layouts
changed inside a model, a model entered through its children, and layouts pergrad cannot follow.

Every per-example result is compared, in float64, with autograd run on one example at a time
(a deep copy of the model, no hooks), with and without the first-backward check.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import pergrad
from pergrad.axes import Axis, Lost, Tracker, axis_of, mark, new_forward, reshape_axis
from pergrad.errors import CaptureError

N = 3
D = 4


def _reference(model, forward_losses, n: int) -> dict[str, torch.Tensor]:
    """{name: (n, *p.shape)}: autograd's gradient of example j's own loss, one example at a time
    (``forward_losses(model, j)`` runs example j alone and returns its loss)."""
    ref = copy.deepcopy(model)
    names = [k for k, p in ref.named_parameters() if p.requires_grad]
    params = [p for p in ref.parameters() if p.requires_grad]
    rows = []
    for j in range(n):
        grads = torch.autograd.grad(forward_losses(ref, j), params, allow_unused=True)
        rows.append([torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)])
    return {k: torch.stack([r[i] for r in rows]) for i, k in enumerate(names)}


def _check(model, losses_of, forward_losses, n, **options):
    """PerExample's gradients, squared norms and second moments against the reference, with the
    check on and off; returns the paths."""
    want = _reference(model, forward_losses, n)
    for verify in ("first", False):
        with pergrad.PerExample(model, grads=True, second_moment=True, verify=verify, **options) as pe:
            result = pe.backward(losses_of(model))
        scale = max(float(w.abs().max()) for w in want.values())
        for name, w in want.items():
            assert (result.grads[name] - w).abs().max() <= 1e-10 * scale, name
            sq = w.reshape(n, -1).square().sum(1)
            assert (result.param_sq_norms[name] - sq).abs().max() <= 1e-10 * scale**2 * w[0].numel(), name
            assert (result.second_moment[name] - w.square().sum(0)).abs().max() <= 1e-10 * scale**2 * n, name
    return pe.paths


def _sequence_first(t: int, n: int = N, d: int = D) -> torch.Tensor:
    return torch.randn(t, n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(t * 10 + n))


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _seq_first_losses(output, weights):
    """(t, n, d) -> (n,): a weighted sum over positions and features per example."""
    return (_first(output) * weights).sum((0, 2))


LAYERS = {
    "linear": lambda: nn.Linear(D, D),
    "encoder": lambda: nn.TransformerEncoderLayer(D, 2, 8, dropout=0.0),
    "encoder-norm-first": lambda: nn.TransformerEncoderLayer(D, 2, 8, dropout=0.0, norm_first=True),
    "lstm": lambda: nn.LSTM(D, D, num_layers=2),
    "gru": lambda: nn.GRU(D, D, bidirectional=True),
}


@pytest.mark.parametrize("t", [N, 2 * N, N + 2], ids=["t-equals-n", "t-multiple-of-n", "t-neither"])
@pytest.mark.parametrize("layer", list(LAYERS))
def test_pytorch_layers_fed_sequence_first(layer, t):
    torch.manual_seed(0)
    model = LAYERS[layer]().double()
    x = _sequence_first(t)
    width = 2 * D if layer == "gru" else D
    weights = torch.randn(t, 1, width, dtype=torch.float64)
    paths = _check(
        model,
        lambda m: _seq_first_losses(m(x), weights),
        lambda m, j: _seq_first_losses(m(x[:, j : j + 1]), weights)[0],
        N,
        batch_first=False,
    )
    assert not any(p.startswith("torch.func") for p in paths.values()), paths


@pytest.mark.parametrize("t", [N, 2 * N, N + 2], ids=["t-equals-n", "t-multiple-of-n", "t-neither"])
def test_decoder_layer_fed_sequence_first(t):
    torch.manual_seed(1)
    model = nn.TransformerDecoderLayer(D, 2, 8, dropout=0.0).double()
    tgt, memory = _sequence_first(t), _sequence_first(t + 1)
    weights = torch.randn(t, 1, D, dtype=torch.float64)
    _check(
        model,
        lambda m: _seq_first_losses(m(tgt, memory), weights),
        lambda m, j: _seq_first_losses(m(tgt[:, j : j + 1], memory[:, j : j + 1]), weights)[0],
        N,
        batch_first=False,
    )


class TransposesInside(nn.Module):
    """Examples first outside; inside, sequence-first layers (as Opacus's DPRNN runs its cells),
    then back: a layer's own ``batch_first`` says nothing of what its caller did."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(D, D)
        self.rnn = nn.LSTM(D, D)  # batch_first=False
        self.encoder = nn.TransformerEncoderLayer(D, 2, 8, dropout=0.0)  # batch_first=False
        self.head = nn.Linear(D, 2)

    def forward(self, x):  # (n, t, d)
        h = self.embed(x).transpose(0, 1)  # (t, n, d)
        h, _ = self.rnn(h)
        h = self.encoder(h)
        return self.head(h.transpose(0, 1).reshape(-1, D)).reshape(x.shape[0], x.shape[1], 2)


@pytest.mark.parametrize("t", [N, 2 * N, N + 2], ids=["t-equals-n", "t-multiple-of-n", "t-neither"])
def test_a_model_that_transposes_to_sequence_first_inside_and_back(t):
    torch.manual_seed(2)
    model = TransposesInside().double()
    x = _sequence_first(t).transpose(0, 1).contiguous()  # (n, t, d)

    def losses(out):
        return out.square().sum((1, 2))

    paths = _check(model, lambda m: losses(m(x)), lambda m, j: losses(m(x[j : j + 1]))[0], N)
    assert paths["rnn"] == "rule RecurrentRule"


class Table(nn.Module):
    """A position table: returns a tensor computed from its parameter alone."""

    def __init__(self, t):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(t, D))

    def forward(self):
        return self.weight


class Net(nn.Module):
    def __init__(self, t):
        super().__init__()
        self.positions, self.body = Table(t), nn.Linear(D, 1)

    def forward(self, x):  # (n, t, d)
        return self.body(torch.tanh(x + self.positions())).squeeze(-1).sum(1)


class Module(nn.Module):
    """A LightningModule's shape: the hooked model is the outer module, but ``training_step``
    calls its child, so the outer forward never runs."""

    def __init__(self, t):
        super().__init__()
        self.net = Net(t)

    def training_step(self, x):
        return self.net(x)


def test_entered_through_a_child_that_holds_a_parameter_only_module():
    torch.manual_seed(3)
    t = 5
    module = Module(t).double()
    x = torch.randn(N, t, D, dtype=torch.float64)
    paths = _check(module, lambda m: m.training_step(x), lambda m, j: m.training_step(x[j : j + 1])[0], N)
    assert paths["net.positions"] == "direct (add)"


class TwoChildren(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder, self.head = nn.Sequential(nn.Linear(D, D), nn.Tanh()), nn.Linear(D, 1)


def test_several_children_called_in_one_step():
    """encoder(x) then, outside any module, an operation, then head(h): two forward passes of
    the hooked model, the second fed what the first returned."""
    torch.manual_seed(4)
    model = TwoChildren().double()
    x = torch.randn(N, 2, D, dtype=torch.float64)

    def losses(m, x):
        return m.head(m.encoder(x).mean(1)).squeeze(-1)

    _check(model, lambda m: losses(m, x), lambda m, j: losses(m, x[j : j + 1])[0], N)


def test_a_lightning_module_fitted_with_the_callback_through_a_child():
    """A real lightning.Trainer: training_step calls the child; nothing crashes and the step's
    statistics are logged."""
    import lightning  # in the test extra

    from pergrad.integrations.lightning import PergradCallback

    class LitModule(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = Net(5)

        def training_step(self, batch, batch_idx):
            (x,) = batch
            return self.net(x).square().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    torch.manual_seed(5)
    data = torch.utils.data.TensorDataset(torch.randn(12, 5, D))
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    trainer = lightning.Trainer(
        max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[PergradCallback()],
    )  # fmt: skip
    trainer.fit(LitModule(), loader)
    assert torch.isfinite(trainer.callback_metrics["pergrad/trace_sigma"])


class Spectral(nn.Module):
    """Its examples go through an FFT, which pergrad does not follow."""

    def __init__(self):
        super().__init__()
        self.mix = nn.Linear(D // 2 + 1, 2)

    def forward(self, x):  # (t, n, d)
        return self.mix(torch.fft.rfft(x, dim=-1).abs())


def test_a_layout_pergrad_cannot_follow_raises_and_says_what_to_declare():
    model = Spectral().double()
    x = _sequence_first(5)
    with pergrad.PerExample(model, batch_first=False) as pe:
        with pytest.raises(CaptureError, match=r"lost at torch.fft_rfft.*example_axes=\{'mix': axis\}"):
            pe.backward(model(x).square().sum((0, 2)))


def test_the_declared_axis_is_used_where_the_forward_cannot_be_followed():
    torch.manual_seed(6)
    model = Spectral().double()
    x = _sequence_first(5)
    _check(
        model,
        lambda m: m(x).square().sum((0, 2)),
        lambda m, j: m(x[:, j : j + 1]).square().sum((0, 2))[0],
        N,
        batch_first=False,
        example_axes={"mix": 1},
    )


def test_sequence_first_data_in_a_batch_first_model_is_refused_not_mixed():
    """An LSTM(batch_first=True) fed (t, n, d) without saying so would recur over the examples."""
    model = nn.LSTM(D, D, batch_first=True).double()
    x = _sequence_first(5)
    with pergrad.PerExample(model, batch_first=False) as pe:
        with pytest.raises(CaptureError, match="along axis 0 of its input, but the input holds them along axis 1"):
            pe.backward(model(x)[0].square().sum((0, 2)))


def test_unknown_paths_in_example_axes_are_refused():
    with pytest.raises(ValueError, match="not modules of the model"):
        pergrad.PerExample(nn.Linear(2, 2), example_axes={"encoder": 1})


# --- the tracker's rules, one operation at a time ----------------------------------------------


def _follow(fn, x, state=Axis(0)):
    new_forward()
    mark(x, state)
    with Tracker():
        return axis_of(fn(x))


@pytest.mark.parametrize(
    "fn, want",
    [
        (lambda x: x.transpose(0, 1), Axis(1)),
        (lambda x: x.reshape(-1, 4), Axis(0, 1, 3)),  # (n·t, d): each example's t rows together
        (lambda x: x.transpose(0, 1).reshape(-1, 4), Axis(0, 3, 1)),  # (t·n, d): strided
        (lambda x: x.reshape(-1, 4).view(2, 3, 4), Axis(0)),
        (lambda x: x.permute(2, 0, 1), Axis(1)),
        (lambda x: x[:, 0], Axis(0)),
        (lambda x: x[..., :2], Axis(0)),
        (lambda x: x[None], Axis(1)),
        (lambda x: x[torch.arange(2), torch.tensor([2, 0])], Axis(0)),
        (lambda x: torch.cat([torch.zeros(2, 1, 4), x], 1), Axis(0)),
        (lambda x: torch.stack([x, x], 0), Axis(1)),
        (lambda x: x.mean(1), Axis(0)),
        (lambda x: torch.einsum("ntd,de->nte", x, torch.ones(4, 2)), Axis(0)),
        (lambda x: torch.ones(5, 3) @ x, Axis(0)),
        (lambda x: x.unsqueeze(1).expand(2, 5, 3, 4), Axis(0)),
        (lambda x: x.softmax(-1), Axis(0)),
    ],
)
def test_the_tracker_follows(fn, want):
    assert _follow(fn, torch.randn(2, 3, 4)) == want


@pytest.mark.parametrize(
    "fn",
    [
        lambda x: x.mean(0),  # over the examples: mixed
        lambda x: x[0],  # one example
        lambda x: x[:1],  # part of them
        lambda x: x.softmax(0),
        lambda x: x.reshape(3, 2, 4),  # examples split across axes
        lambda x: torch.cat([x, x], 0),
        lambda x: torch.fft.rfft(x, dim=-1).real,  # not modelled
        lambda x: x[torch.tensor([1, 0])],  # picked by an index that is not 0…n−1
    ],
)
def test_the_tracker_loses_the_axis_where_examples_mix_or_it_cannot_tell(fn):
    assert isinstance(_follow(fn, torch.randn(2, 3, 4)), Lost)


def test_reshape_axis_keeps_examples_together_or_gives_up():
    assert reshape_axis((6, 4), (2, 3, 4), Axis(0, 1, 3)) == Axis(0)
    assert reshape_axis((6, 4), (3, 2, 4), Axis(0, 3, 1)) == Axis(1)
    assert reshape_axis((6, 4), (3, 8), Axis(0, 1, 3)) is None  # n = 2 examples split over two axes


def test_nn_transformer_sequence_first_with_its_masks():
    """PyTorch's own nn.Transformer: (s, n, e) and (t, n, e) inputs, a causal mask (t, t) without
    examples, key padding masks (n, s) batch-first as PyTorch defines them."""
    torch.manual_seed(7)
    layer = nn.TransformerEncoderLayer(D, 2, 8, dropout=0.0)
    encoder = nn.TransformerEncoder(layer, 1, norm=nn.LayerNorm(D), enable_nested_tensor=False)
    model = nn.Transformer(d_model=D, nhead=2, num_decoder_layers=1, dim_feedforward=8, dropout=0.0,
                           custom_encoder=encoder).double()  # fmt: skip
    src, tgt = _sequence_first(6), _sequence_first(5)
    causal = nn.Transformer.generate_square_subsequent_mask(5, dtype=torch.float64)
    padding = torch.zeros(N, 6, dtype=torch.bool)
    padding[0, -2:] = True  # example 0's last two source positions are padding

    def losses(m, s, t, pad):
        out = m(s, t, tgt_mask=causal, src_key_padding_mask=pad, memory_key_padding_mask=pad)
        return out.square().sum((0, 2))

    _check(
        model,
        lambda m: losses(m, src, tgt, padding),
        lambda m, j: losses(m, src[:, j : j + 1], tgt[:, j : j + 1], padding[j : j + 1])[0],
        N,
        batch_first=False,
    )
    with pergrad.PerExample(model) as pe:  # not declared: refused, and the message says what to declare
        with pytest.raises(CaptureError, match=r"batch_first=False"):
            pe.backward(losses(model, src, tgt, padding))
