"""Models that exercise every registered rule, for the conformance and identity tests.

Each :class:`Case` builds a float64 model whose examples lie along axis 0 of its input, and
inputs for any n. ``RULE_CASES`` maps each registered module class to the cases that cover
it; a rule registered without cases fails the coverage test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Case:
    name: str
    make_model: Callable[[], nn.Module]
    make_input: Callable[[int, torch.Generator], Tensor]
    on_unsupported: str = "error"

    def __str__(self) -> str:
        return self.name


def _randn(*shape):
    return lambda n, gen: torch.randn(n, *shape, generator=gen, dtype=torch.float64)


def _tokens(vocab, t, pad=None):
    def make(n, gen):
        idx = torch.randint(0, vocab, (n, t), generator=gen)
        idx[:, 1] = idx[:, 0]  # a repeated index in every example
        if pad is not None:
            idx[:, -1] = pad
        return idx

    return make


class Twice(nn.Module):
    """One Linear called twice in a forward: shared weights across calls."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(torch.tanh(self.lin(x)))


class ConvTwice(nn.Module):
    """One Conv2d applied twice (same channels in and out): shared weights across calls."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x):
        return self.conv(torch.tanh(self.conv(x)))


class TiedLM(nn.Module):
    """Embedding tied to the output head: one Parameter in two modules."""

    def __init__(self, vocab=11, d=6):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        return self.head(self.norm(self.emb(idx)))


class Attention(nn.Module):
    """MultiheadAttention fed batch-first; transposes inside when batch_first=False."""

    def __init__(self, batch_first: bool, masked=False, kdim=None, use_weights=False, causal=False, **options):
        super().__init__()
        self.batch_first, self.masked, self.use_weights, self.causal = batch_first, masked, use_weights, causal
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first, kdim=kdim, vdim=kdim, **options)
        self.kv = nn.Linear(8, kdim) if kdim else nn.Identity()

    def forward(self, x):  # x: (n, t, 8)
        kv = self.kv(x)
        q, kv = (x, kv) if self.batch_first else (x.transpose(0, 1), kv.transpose(0, 1))
        mask = None
        if self.masked:
            mask = torch.zeros(x.shape[0], x.shape[1], dtype=torch.bool)
            mask[:, -1] = True  # the last key of every example is padding
        if self.causal:  # self-attention (query, key and value one tensor) with a causal mask
            t = x.shape[1]
            causal = torch.ones(t, t, dtype=torch.bool).triu(1)
            out, weights = self.attn(q, q, q, attn_mask=causal, need_weights=False)
        else:
            out, weights = self.attn(q, kv, kv, key_padding_mask=mask, need_weights=self.use_weights)
        out = out if self.batch_first else out.transpose(0, 1)
        return out + weights.square().sum(-1, keepdim=True) if self.use_weights else out


class Recurrent(nn.Module):
    """nn.RNN/LSTM/GRU fed (n, t, 3) examples first, in its own layout inside, with a Linear
    head. Its initial state comes from the first time step through a Linear (the torch.func
    reference vmaps the whole model: zeros left to the module would have no example axis);
    ``use_state`` adds the final hidden state to the output."""

    def __init__(self, cls, batch_first, use_state=False, **options):
        super().__init__()
        self.rnn = cls(3, 4, batch_first=batch_first, **options)
        self.use_state = use_state
        self.states = self.rnn.num_layers * (2 if self.rnn.bidirectional else 1)
        self.h_out = options.get("proj_size") or 4
        self.c = 4 if cls is nn.LSTM else 0
        self.init = nn.Linear(3, self.states * (self.h_out + self.c))
        self.head = nn.Linear((2 if self.rnn.bidirectional else 1) * self.h_out, 2)

    def forward(self, x):
        n = x.shape[0]
        init = torch.tanh(self.init(x[:, 0])).reshape(n, self.states, -1).transpose(0, 1)
        h0 = init[..., : self.h_out].contiguous()
        hx = (h0, init[..., self.h_out :].contiguous()) if self.c else h0
        out, state = self.rnn(x if self.rnn.batch_first else x.transpose(0, 1), hx)
        y = self.head(out if self.rnn.batch_first else out.transpose(0, 1))
        if self.use_state:
            h_n = state[0] if self.c else state
            y = y + h_n.sum(0)[:, None, :2]
        return y


class Scale(nn.Module):
    """A layer with no rule: y = x ⊙ w (handled by the torch.func fallback)."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x):
        return x * self.w


class KeywordLayerNorm(nn.Module):
    """A LayerNorm given its input by keyword: its rule recomputes the normalised input
    (the forward's statistics are exposed only for a positional input)."""

    def __init__(self):
        super().__init__()
        self.lin, self.norm = nn.Linear(4, 6), nn.LayerNorm(6)

    def forward(self, x):
        return self.norm(input=self.lin(x))


def _tokens_with_zero(vocab, t):
    """Token 0 (BOS or padding in real vocabularies) twice in every example, and a repeat."""

    def make(n, gen):
        idx = torch.randint(0, vocab, (n, t), generator=gen)
        idx[:, 0] = idx[:, 3] = 0
        idx[:, 2] = idx[:, 1]
        return idx

    return make


class TiedNoPadding(TiedLM):
    """The tied LM without a padding row: token 0's row gets gradients from both uses."""

    def __init__(self):
        super().__init__()
        self.emb.padding_idx = None


class ScaledEmbedding(nn.Embedding):
    """BART's ``BartScaledWordEmbedding``: an Embedding subclass that scales its output (its own
    forward, so no inherited rule: the direct path)."""

    def forward(self, idx):
        return super().forward(idx) * 2.0


class ScaledTiedLM(nn.Module):
    """BART's pattern: a scaled embedding (direct path) tied to the output head (Linear rule)."""

    def __init__(self, vocab=11, d=6):
        super().__init__()
        self.emb = ScaledEmbedding(vocab, d)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        return self.head(torch.tanh(self.norm(self.emb(idx))))


class Conv1D(nn.Module):
    """GPT-2's ``Conv1D``: weight (i, o), ``addmm`` (the direct path's "io" linear map)."""

    def __init__(self, i, o):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(i, o) / i**0.5)
        self.bias = nn.Parameter(torch.randn(o) / 10)

    def forward(self, x):
        out = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)
        return out.reshape(*x.shape[:-1], -1)


class ReExposed(nn.Module):
    """A parent that registers its children's weights again under names of its own, as Opacus's
    ``DPRNN`` does: each parameter lives in two modules and must count once."""

    def __init__(self):
        super().__init__()
        self.cell = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)
        self.weight_ih_l0 = self.cell.weight
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 4))

    def forward(self, x):  # (n, t, 4)
        h = torch.tanh(self.cell(x)) * self.scale
        return self.out(torch.tanh(self.cell(h)))


class DirectTwice(nn.Module):
    """A module without a rule called twice: its direct path's records of the two calls add."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.scale = Scale(4)

    def forward(self, x):
        return self.lin(self.scale(torch.tanh(self.scale(self.lin(x)))))


class Bags(nn.Module):
    """EmbeddingBag fed 1-D indices with offsets: an example's bag is the first ``last mod (s+1)``
    tokens of its row, ``last`` its last token (some bags are empty), weighted per sample."""

    def __init__(self, mode="sum", include_last_offset=False, weighted=True):
        super().__init__()
        self.bag = nn.EmbeddingBag(9, 4, mode=mode, include_last_offset=include_last_offset, padding_idx=5)
        self.weighted = weighted
        self.head = nn.Linear(4, 3)

    def forward(self, idx):  # (n, s)
        n, s = idx.shape
        lengths = idx[:, -1] % (s + 1)
        flat = torch.cat([idx[j, : lengths[j]] for j in range(n)])
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        if not self.bag.include_last_offset:
            offsets = offsets[:-1]
        weights = (flat.double() + 1) / 5 if self.weighted else None
        return self.head(self.bag(flat, offsets, per_sample_weights=weights))


def _eval_batchnorm(bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn.eval()


def _frozen_weight():
    m = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    m[0].weight.requires_grad_(False)
    m[2].bias.requires_grad_(False)
    return m


LINEAR = [
    Case("linear-2d", lambda: nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)), _randn(5)),
    Case("linear-seq", lambda: nn.Linear(6, 3), _randn(4, 6)),
    Case("linear-seq-gram", lambda: nn.Linear(16, 16), _randn(3, 16)),
    Case("linear-4d-nobias", lambda: nn.Linear(3, 2, bias=False), _randn(2, 3, 3)),
    Case("linear-frozen", _frozen_weight, _randn(3)),
    Case("linear-frozen-seq", _frozen_weight, _randn(6, 3)),  # pieces built in the backward, weight or bias frozen
    Case("linear-called-twice", Twice, _randn(4)),
    Case("linear-tied-to-embedding", TiedLM, _tokens(11, 5, pad=0)),
    Case("linear-tied-token-0", TiedNoPadding, _tokens_with_zero(11, 6)),
]
CONV = [
    Case("conv1d-stride-pad", lambda: nn.Conv1d(3, 4, 3, stride=2, padding=1), _randn(3, 9)),
    Case("conv1d-same-dilated", lambda: nn.Conv1d(2, 3, 4, padding="same", dilation=2), _randn(2, 10)),
    Case("conv2d-groups-dilation", lambda: nn.Conv2d(4, 6, 3, dilation=2, groups=2, padding=2), _randn(4, 7, 6)),
    Case("conv2d-rect-stride", lambda: nn.Conv2d(2, 3, (2, 3), stride=(2, 1), bias=False), _randn(2, 6, 7)),
    Case("conv2d-reflect", lambda: nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), _randn(2, 5, 5)),
    Case("conv2d-circular-depthwise", lambda: nn.Conv2d(3, 3, 3, padding=1, padding_mode="circular", groups=3), _randn(3, 4, 5)),
    Case("conv2d-gram", lambda: nn.Conv2d(8, 8, 3), _randn(8, 4, 4)),
    Case("conv1d-small-patches", lambda: nn.Conv1d(1, 4, 3, stride=2), _randn(1, 9)),
    Case("conv2d-small-patches-grouped", lambda: nn.Conv2d(2, 8, (1, 2), groups=2, padding=1), _randn(2, 5, 4)),
    Case("conv3d-small-patches", lambda: nn.Conv3d(1, 8, 2, padding=1, padding_mode="replicate"), _randn(1, 3, 4, 3)),
    Case("conv2d-same-uneven", lambda: nn.Conv2d(2, 3, (2, 3), padding="same"), _randn(2, 5, 4)),
    Case("conv2d-shared-twice", ConvTwice, _randn(2, 5, 5)),
    Case("conv3d", lambda: nn.Conv3d(2, 3, (2, 3, 2), stride=(1, 2, 1), padding=(1, 0, 1)), _randn(2, 4, 5, 3)),
]
EMBEDDING = [
    Case("embedding-repeats", lambda: nn.Embedding(7, 4), _tokens(7, 6)),
    Case("embedding-padding-idx", lambda: nn.Embedding(7, 4, padding_idx=3), _tokens(7, 5, pad=3)),
]
BAGS = [
    Case("embeddingbag-2d-sum", lambda: nn.Sequential(nn.EmbeddingBag(9, 4, mode="sum"), nn.Linear(4, 2)), _tokens_with_zero(9, 5)),
    Case("embeddingbag-2d-mean-padding", lambda: nn.EmbeddingBag(9, 4, padding_idx=3), _tokens(9, 5, pad=3)),
    Case("embeddingbag-2d-max", lambda: nn.Sequential(nn.EmbeddingBag(9, 4, mode="max"), nn.Linear(4, 2)), _tokens_with_zero(9, 4)),
    Case("embeddingbag-offsets-weights", Bags, _tokens_with_zero(9, 5)),
    Case("embeddingbag-offsets-mean-last", lambda: Bags("mean", include_last_offset=True, weighted=False), _tokens_with_zero(9, 5)),
]
DIRECT = [
    Case("direct-scaled-embedding-tied-token-0", ScaledTiedLM, _tokens_with_zero(11, 6), "auto"),
    Case("direct-conv1d-io", lambda: nn.Sequential(Conv1D(5, 4), nn.Tanh(), Conv1D(4, 3)), _randn(3, 5), "auto"),
    Case("direct-parameter-on-two-modules", ReExposed, _randn(3, 4), "auto"),
    Case("direct-called-twice", DirectTwice, _randn(3, 4), "auto"),
]
NORMS = [
    Case("layernorm-seq", lambda: nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6)), _randn(3, 4)),
    Case("layernorm-2axes", lambda: nn.LayerNorm((3, 4)), _randn(2, 3, 4)),
    Case("layernorm-keyword", KeywordLayerNorm, _randn(3, 4)),
    Case("groupnorm", lambda: nn.Sequential(nn.Conv2d(2, 6, 3), nn.GroupNorm(3, 6)), _randn(2, 5, 5)),
    Case("rmsnorm", lambda: nn.Sequential(nn.Linear(4, 5), nn.RMSNorm(5)), _randn(3, 4)),
    Case("batchnorm1d-eval", lambda: nn.Sequential(nn.Linear(3, 4), _eval_batchnorm(nn.BatchNorm1d(4))), _randn(3)),
    Case("batchnorm2d-eval", lambda: nn.Sequential(nn.Conv2d(2, 3, 2), _eval_batchnorm(nn.BatchNorm2d(3))), _randn(2, 4, 4)),
]
ATTENTION = [
    Case("mha-batch-first", lambda: Attention(True), _randn(5, 8)),
    Case("mha-seq-first-masked", lambda: Attention(False, masked=True), _randn(5, 8)),
    Case("mha-self-causal", lambda: Attention(True, causal=True), _randn(5, 8)),
    Case("mha-self-causal-seq-first", lambda: Attention(False, causal=True), _randn(4, 8)),
    Case("mha-kdim", lambda: Attention(True, kdim=6), _randn(4, 8)),
    Case("mha-bias-kv-zero-attn", lambda: Attention(True, add_bias_kv=True, add_zero_attn=True), _randn(3, 8)),
    Case("mha-loss-uses-weights", lambda: Attention(False, masked=True, use_weights=True), _randn(4, 8)),
]
RECURRENT = [
    Case("rnn-batch-first", lambda: Recurrent(nn.RNN, True), _randn(5, 3)),
    Case(
        "rnn-seq-first-relu-2-layers-bidir",
        lambda: Recurrent(nn.RNN, False, True, nonlinearity="relu", num_layers=2, bidirectional=True),
        _randn(4, 3),
    ),
    Case(
        "lstm-batch-first-2-layers-bidir-state",
        lambda: Recurrent(nn.LSTM, True, True, num_layers=2, bidirectional=True),
        _randn(4, 3),
    ),
    Case("lstm-seq-first-proj", lambda: Recurrent(nn.LSTM, False, True, proj_size=2), _randn(5, 3)),
    Case("gru-seq-first", lambda: Recurrent(nn.GRU, False), _randn(5, 3)),
    Case("gru-batch-first-no-bias-bidir", lambda: Recurrent(nn.GRU, True, True, bias=False, bidirectional=True), _randn(3, 3)),
]
FALLBACK = [
    Case("fallback-custom-layer", lambda: nn.Sequential(nn.Linear(3, 4), Scale(4)), _randn(3), "fallback"),
]

RULE_CASES: dict[type[nn.Module], list[Case]] = {
    nn.Linear: LINEAR,
    nn.Conv1d: [c for c in CONV if c.name.startswith("conv1d")],
    nn.Conv2d: [c for c in CONV if c.name.startswith("conv2d")],
    nn.Conv3d: [c for c in CONV if c.name.startswith("conv3d")],
    nn.Embedding: EMBEDDING + [LINEAR[-1]],
    nn.LayerNorm: [c for c in NORMS if c.name.startswith("layernorm")],
    nn.GroupNorm: [c for c in NORMS if c.name.startswith("groupnorm")],
    nn.RMSNorm: [c for c in NORMS if c.name.startswith("rmsnorm")],
    nn.modules.batchnorm._BatchNorm: [c for c in NORMS if c.name.startswith("batchnorm")],
    nn.MultiheadAttention: ATTENTION,
    nn.EmbeddingBag: BAGS,
    nn.RNN: [c for c in RECURRENT if c.name.startswith("rnn")],
    nn.LSTM: [c for c in RECURRENT if c.name.startswith("lstm")],
    nn.GRU: [c for c in RECURRENT if c.name.startswith("gru")],
}
ALL_CASES = LINEAR + CONV + EMBEDDING + BAGS + NORMS + ATTENTION + RECURRENT + DIRECT + FALLBACK


def build(case: Case, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return case.make_model().double()
