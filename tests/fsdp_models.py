"""The models and data of the FSDP2 tests, shared by the torchrun worker (tests/fsdp_worker.py) and the
single-process reference in tests/test_fsdp.py: an embedding tied to the head (token 0 and repeated
tokens in the data), LayerNorm, Linear, a module with a directly used parameter (no rule), and a bare
position parameter on the model itself."""

from __future__ import annotations

import torch
from torch import Tensor, nn

V, D, T = 11, 6, 4  # vocabulary, width, positions
N = 8  # the global batch


class Gain(nn.Module):
    """x · w: no registered rule (the direct path, or torch.func under on_unsupported='fallback')."""

    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(d))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(D)
        self.fc = nn.Linear(D, D)
        self.gain = Gain(D)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.gain(torch.tanh(self.fc(self.ln(h))))


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.pos = nn.Parameter(0.1 * torch.randn(T, D))  # used directly by the model's forward
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(D, V, bias=False)
        self.head.weight = self.emb.weight  # tied

    def forward(self, idx: Tensor) -> Tensor:
        h = self.emb(idx) + self.pos
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def model(dtype=torch.float64) -> TinyLM:
    torch.manual_seed(0)
    return TinyLM().to(dtype)


def data() -> tuple[Tensor, Tensor]:
    """(N, T) tokens, with token 0 and repeats, and (N, T) targets."""
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, V, (N, T), generator=g)
    idx[:, 0] = 0
    idx[1] = 3  # one token repeated over every position
    return idx, torch.randint(0, V, (N, T), generator=g)


def losses(m: nn.Module, idx: Tensor, y: Tensor) -> Tensor:
    """(n,) cross-entropy summed over positions (computed in float32 at least)."""
    out = m(idx)
    out = out.to(torch.promote_types(out.dtype, torch.float32))
    return nn.functional.cross_entropy(out.transpose(1, 2), y, reduction="none").sum(1)
