"""Small models for the embedded datasets. Every layer has a pergrad rule."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import ConfigError, TrainConfig
from .data import Dataset

__all__ = ["build_model"]


def build_model(config: TrainConfig, dataset: Dataset) -> nn.Module:
    """The config's model for the dataset, initialised from the config's seed.

    Raises:
        ConfigError: the model does not fit the dataset (say, a CNN for linear regression).
    """
    torch.manual_seed(config.seed)
    key = (config.model, dataset.name)
    out = dataset.num_classes or 1
    if key == ("linear", "linreg"):
        return nn.Linear(dataset.train_x.shape[1], 1)
    if config.model == "mlp" and dataset.name in ("digits", "linreg"):
        d = dataset.train_x.shape[1]
        return nn.Sequential(nn.Linear(d, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, out))
    if config.model == "mlp" and dataset.name == "sequence":
        return SequenceMLP(dataset.num_classes, dataset.train_x.shape[1])
    if key == ("cnn", "digits"):
        return nn.Sequential(
            nn.Unflatten(1, (1, *dataset.image_shape)),
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 4 * 4, out),
        )  # fmt: skip
    if key == ("cnn", "sequence"):
        return SequenceCNN(dataset.num_classes)
    if config.model == "transformer" and dataset.name in ("digits", "sequence"):
        return Transformer(dataset)
    fits = {"mlp": "digits, linreg, sequence", "cnn": "digits, sequence",
            "transformer": "digits, sequence", "linear": "linreg"}  # fmt: skip
    raise ConfigError(f"model {config.model!r} does not fit dataset {dataset.name!r}: it fits {fits[config.model]}")


class SequenceMLP(nn.Module):
    """Token embeddings, flattened, through an MLP that predicts every position: (n, t) -> (n, t, V)."""

    def __init__(self, vocab: int, length: int, d: int = 16, hidden: int = 128):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(length * d, hidden), nn.ReLU(), nn.Linear(hidden, length * vocab)
        )
        self.vocab = vocab

    def forward(self, tokens: Tensor) -> Tensor:
        return self.net(self.embed(tokens)).reshape(tokens.shape[0], tokens.shape[1], self.vocab)


class SequenceCNN(nn.Module):
    """Embeddings through a causal 1-D convolution (kernel 2: the token and the one before)."""

    def __init__(self, vocab: int, d: int = 32):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.conv = nn.Conv1d(d, 64, 2)
        self.head = nn.Linear(64, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(torch.cat([tokens[:, :1], tokens], 1)).transpose(1, 2)  # (n, d, t + 1)
        return self.head(torch.relu(self.conv(h)).transpose(1, 2))  # (n, t, V)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(LN x), then x + MLP(LN x)."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:  # x: (n, t, d)
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class Transformer(nn.Module):
    """A 2-block transformer. Sequences: causal next-token logits (n, t, V). Digits: the 8 rows
    of an image as 8 tokens, mean-pooled into class logits (n, 10)."""

    def __init__(self, dataset: Dataset, d: int = 64, heads: int = 4, blocks: int = 2):
        super().__init__()
        self.tokens = dataset.image_shape is None
        if self.tokens:
            length = dataset.train_x.shape[1]
            self.embed = nn.Embedding(dataset.num_classes, d)
        else:
            length, width = dataset.image_shape
            self.embed = nn.Linear(width, d)
        self.length = length
        self.position = nn.Embedding(length, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(blocks))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, dataset.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[0]
        h = self.embed(x) if self.tokens else self.embed(x.reshape(n, self.length, -1))
        h = h + self.position(torch.arange(self.length, device=x.device).expand(n, -1))
        mask = None
        if self.tokens:
            mask = torch.ones(self.length, self.length, dtype=torch.bool, device=x.device).triu(1)
        for block in self.blocks:
            h = block(h, mask)
        h = self.ln(h)
        return self.head(h) if self.tokens else self.head(h.mean(1))
