"""Per-example quantities at the saved parameters θ over the training set, in float64.

One pass in chunks through :class:`pergrad.PerExample` gives each training example's loss,
prediction and gradient norm ‖∇ℓᵢ(θ)‖; a second, optional pass stacks the per-example
gradients themselves into a matrix (n, p) for the unbiasedness check.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from .._tensors import flatten
from ..per_example import PerExample
from ..train.losses import per_example_losses, predictions

__all__ = ["ExamplesAtTheta", "float64_copy", "examples_at_theta", "per_example_gradients"]

CHUNK = 256  # examples per backward pass
CHUNK_ENTRIES = 10_000_000  # at most this many per-example gradient entries per backward pass


@dataclass(frozen=True)
class ExamplesAtTheta:
    """Each training example at θ.

    Attributes:
        norms: (N,) ‖∇θ ℓᵢ‖ over all trainable parameters.
        losses: (N,) ℓᵢ.
        predictions: (N,) predicted class or value, or (N, t) predicted tokens.
    """

    norms: np.ndarray
    losses: np.ndarray
    predictions: Tensor


def float64_copy(model: nn.Module) -> nn.Module:
    """A float64 copy of ``model`` in eval mode (the original is left as it is)."""
    return copy.deepcopy(model).to(torch.float64).eval()


def _inputs(x: Tensor) -> Tensor:
    """Float inputs in float64; token ids stay integers."""
    return x.to(torch.float64) if x.is_floating_point() else x


def examples_at_theta(model: nn.Module, x: Tensor, y: Tensor, task: str) -> ExamplesAtTheta:
    """Losses, predictions and gradient norms of every example.

    Args:
        model: float64, eval mode; its ``.grad`` fields are overwritten.
        x: (N, ...) training inputs.
        y: (N,) or (N, t) targets.
        task: "classification" or "regression".
    """
    norms, losses, preds = [], [], []
    with PerExample(model) as pe:
        for start in range(0, x.shape[0], CHUNK):
            xb, yb = _inputs(x[start : start + CHUNK]), y[start : start + CHUNK]
            model.zero_grad(set_to_none=True)
            out = model(xb)
            loss = per_example_losses(task, out, _targets(yb, task))
            result = pe.backward(loss, reduction="sum")
            norms.append(result.sq_norms.sqrt())
            losses.append(loss.detach())
            preds.append(predictions(task, out.detach()))
    model.zero_grad(set_to_none=True)
    return ExamplesAtTheta(
        norms=torch.cat(norms).numpy(), losses=torch.cat(losses).numpy(), predictions=torch.cat(preds)
    )


def per_example_gradients(model: nn.Module, x: Tensor, y: Tensor, task: str) -> tuple[Tensor, Tensor]:
    """The per-example gradient matrix and, independently, autograd's gradient of the mean loss.

    Args:
        model: float64, eval mode; its ``.grad`` fields are overwritten.
        x: (n, ...) inputs.
        y: (n,) or (n, t) targets.
        task: "classification" or "regression".

    Returns:
        grads: (n, p) float64, row i = ∇θ ℓᵢ flattened in ``model.named_parameters()`` order.
        autograd_mean: (p,) ∇θ (1/n) Σᵢ ℓᵢ from ``.grad`` (losses summed over chunks, then / n).
    """
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    n, size = x.shape[0], sum(p.numel() for _, p in params)
    grads = torch.empty(n, size, dtype=torch.float64)
    chunk = max(1, min(CHUNK, CHUNK_ENTRIES // max(size, 1)))
    model.zero_grad(set_to_none=True)
    with PerExample(model, grads=True) as pe:
        for start in range(0, n, chunk):
            xb, yb = _inputs(x[start : start + chunk]), y[start : start + chunk]
            loss = per_example_losses(task, model(xb), _targets(yb, task))
            result = pe.backward(loss, reduction="sum")  # .grad accumulates Σᵢ ∇ℓᵢ
            grads[start : start + len(loss)] = flatten((result.grads[name] for name, _ in params), per_example=True)
    autograd_mean = flatten(_grad_or_zeros(p) for _, p in params) / n
    model.zero_grad(set_to_none=True)
    return grads, autograd_mean


def _grad_or_zeros(p: nn.Parameter) -> Tensor:
    return torch.zeros_like(p) if p.grad is None else p.grad


def _targets(y: Tensor, task: str) -> Tensor:
    return y.to(torch.float64) if task == "regression" else y
