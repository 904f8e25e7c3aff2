"""The embedded datasets: scikit-learn's digits, and two synthetic tasks with known structure.

Every dataset is built deterministically from the config's seed, so a run directory's
config is enough to rebuild exactly the data it trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .config import TrainConfig

__all__ = ["Dataset", "load_dataset", "LINREG_NOISE", "SEQUENCE_VOCAB", "SEQUENCE_LENGTH"]

LINREG_NOISE = 0.5  # σ of the label noise of the synthetic regression
LINREG_EXAMPLES, LINREG_FEATURES = 2048, 16
SEQUENCE_EXAMPLES, SEQUENCE_VOCAB, SEQUENCE_LENGTH = 2048, 16, 12


@dataclass(frozen=True)
class Dataset:
    """Training and validation tensors with what the models and the report need to know.

    Attributes:
        train_x, val_x: inputs, (N, 64) float for digits, (N, 16) for linreg, (N, t) token ids
            for sequence.
        train_y, val_y: class ids (N,), regression targets (N,), or next-token targets (N, t).
        task: "classification" or "regression".
        num_classes: number of classes (vocabulary for sequence), None for regression.
        image_shape: (8, 8) for digits, else None.
        name: the dataset's name.
    """

    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    task: str
    num_classes: int | None
    image_shape: tuple[int, int] | None
    name: str

    @property
    def labels(self) -> Tensor | None:
        """(N,) one label per training example (for sampling checks), None where there is none."""
        return self.train_y if self.train_y.dim() == 1 and self.task == "classification" else None


def load_dataset(config: TrainConfig) -> Dataset:
    """The config's dataset, split into training and validation by its ``dataset_seed``."""
    gen = torch.Generator().manual_seed(config.dataset_seed)
    if config.dataset == "digits":
        x, y, task, classes, image = *_digits(), "classification", 10, (8, 8)
    elif config.dataset == "linreg":
        x, y, task, classes, image = *_linreg(gen), "regression", None, None
    else:
        x, y, task, classes, image = *_sequence(gen), "classification", SEQUENCE_VOCAB, None
    perm = torch.randperm(x.shape[0], generator=gen)
    n_val = max(1, int(round(config.val_fraction * x.shape[0])))
    val, train = perm[:n_val], perm[n_val:]
    return Dataset(x[train], y[train], x[val], y[val], task, classes, image, config.dataset)


def _digits() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32) / 16.0  # pixel intensities in [0, 1]
    return x, torch.tensor(bunch.target, dtype=torch.long)


def linreg_problem(gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """The synthetic regression's ground truth: covariance eigenvalues h (d,) and w* (d,).

    Inputs x ~ N(0, diag(h)), targets y = xᵀw* + ε with ε ~ N(0, LINREG_NOISE²).
    """
    h = 1.0 / torch.arange(1, LINREG_FEATURES + 1, dtype=torch.float32)
    w_star = torch.randn(LINREG_FEATURES, generator=gen)
    return h, w_star


def _linreg(gen: torch.Generator) -> tuple[Tensor, Tensor]:
    h, w_star = linreg_problem(gen)
    x = torch.randn(LINREG_EXAMPLES, LINREG_FEATURES, generator=gen) * h.sqrt()
    y = x @ w_star + LINREG_NOISE * torch.randn(LINREG_EXAMPLES, generator=gen)
    return x, y


def _sequence(gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Random tokens; the target at position t is the token at t − 1 (position 0: itself)."""
    x = torch.randint(0, SEQUENCE_VOCAB, (SEQUENCE_EXAMPLES, SEQUENCE_LENGTH), generator=gen)
    y = torch.cat([x[:, :1], x[:, :-1]], 1)
    return x, y
