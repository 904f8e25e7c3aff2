"""Per-example losses and accuracies for the tasks of :mod:`.data`."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def per_example_losses(task: str, outputs: Tensor, targets: Tensor) -> Tensor:
    """(n,) one loss per example.

    Classification: cross-entropy; outputs (n, C) with targets (n,), or (n, t, C) with
    targets (n, t), averaged over the t tokens of each example. Regression: ½(f(x) − y)²,
    outputs (n, 1) or (n,), targets (n,).
    """
    if task == "regression":
        return 0.5 * (outputs.reshape(-1) - targets).square()
    if outputs.dim() == 3:
        n, t, c = outputs.shape
        return F.cross_entropy(outputs.reshape(n * t, c), targets.reshape(-1), reduction="none").reshape(n, t).mean(1)
    return F.cross_entropy(outputs, targets, reduction="none")


def per_example_accuracy(task: str, outputs: Tensor, targets: Tensor) -> Tensor | None:
    """(n,) share of correct predictions per example (tokens averaged), None for regression."""
    if task == "regression":
        return None
    correct = (outputs.argmax(-1) == targets).float()
    return correct.reshape(correct.shape[0], -1).mean(1)


def predictions(task: str, outputs: Tensor) -> Tensor:
    """(n,) or (n, t) predicted classes, or (n,) predicted values."""
    return outputs.reshape(-1) if task == "regression" else outputs.argmax(-1)
