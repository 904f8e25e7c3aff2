"""The averaging identity, checked: ∇θ (1/n) Σᵢ ℓᵢ = (1/n) Σᵢ ∇θ ℓᵢ.

Each ∇θ ℓᵢ is computed on its own by autograd (one backward of ℓᵢ through the batch's graph,
no pergrad rule involved), their mean is compared with autograd's gradient of the mean loss,
and, where pergrad supports the model, pergrad's one-pass per-example gradients are compared
with the same references.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from ..errors import PergradError
from ..per_example import PerExample

__all__ = ["IdentityReport", "check_identity"]


@dataclass(frozen=True)
class IdentityReport:
    """How closely the identity holds on one batch.

    Attributes:
        max_abs_diff: max |mean of per-example gradients − gradient of the mean loss|.
        max_rel_diff: the same over the largest |gradient of the mean loss| entry.
        pergrad_max_rel_diff: pergrad's per-example gradients against the one-at-a-time
            autograd ones (relative, largest entry), None where pergrad does not support the model.
        n: examples in the batch.
        dtype: the dtype the check ran in.
        passed: max_rel_diff within the tolerance for the dtype (1e-10 for float64, 1e-4 otherwise).
    """

    max_abs_diff: float
    max_rel_diff: float
    pergrad_max_rel_diff: float | None
    n: int
    dtype: torch.dtype
    passed: bool

    @property
    def explanation(self) -> str:
        verdict = "holds" if self.passed else "does NOT hold"
        text = (
            f"The averaging identity {verdict} on this batch of {self.n}: the mean of the {self.n} "
            f"per-example gradients differs from autograd's gradient of the mean loss by at most "
            f"{self.max_abs_diff:.3g} ({self.max_rel_diff:.3g} relative, {self.dtype})."
        )
        if self.pergrad_max_rel_diff is not None:
            text += f" pergrad's one-pass per-example gradients match them to {self.pergrad_max_rel_diff:.3g}."
        return text


def check_identity(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    *,
    dtype: torch.dtype | None = torch.float64,
) -> IdentityReport:
    """Compare the mean of per-example gradients with autograd's gradient of the mean loss.

    The model is copied (the caller's weights and ``.grad`` are untouched) and cast to
    ``dtype`` (None keeps its own), as are floating inputs and targets.

    Args:
        model: the model; examples along the first axis of ``x``.
        x: (n, ...) inputs.
        y: (n, ...) targets.
        loss_fn: ``loss_fn(outputs, y)`` -> (n,) one loss per example.
        dtype: the precision of the check.

    Raises:
        ValueError: ``loss_fn`` does not return one loss per example.
    """
    model = copy.deepcopy(model)
    if dtype is not None:
        model = model.to(dtype)
        x, y = (t.to(dtype) if t.is_floating_point() else t for t in (x, y))
    params = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    losses = loss_fn(model(x), y)
    n = x.shape[0]
    if losses.shape != (n,):
        raise ValueError(
            f"loss_fn must return one loss per example, shape ({n},), got {tuple(losses.shape)}: "
            "use reduction='none'."
        )
    weights = [p for _, p in params]
    mean_grad = torch.autograd.grad(losses.mean(), weights, retain_graph=True, allow_unused=True)
    per_example = [
        torch.autograd.grad(losses[i], weights, retain_graph=i < n - 1, allow_unused=True) for i in range(n)
    ]
    reference = {
        k: torch.stack([_dense(g[j], p) for g in per_example]) for j, (k, p) in enumerate(params)
    }  # {name: (n, *p.shape)}
    diffs, scale = [], []
    for j, (k, p) in enumerate(params):
        target = _dense(mean_grad[j], p)
        diffs.append((reference[k].mean(0) - target).abs().max())
        scale.append(target.abs().max())
    max_abs = float(torch.stack(diffs).max()) if diffs else 0.0
    max_rel = max_abs / max(float(torch.stack(scale).max()) if scale else 0.0, 1e-300)
    tolerance = 1e-10 if _model_dtype(model) == torch.float64 else 1e-4
    return IdentityReport(
        max_abs, max_rel, _pergrad_diff(model, x, y, loss_fn, reference), n, _model_dtype(model), max_rel <= tolerance
    )


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters()), torch.get_default_dtype())


def _dense(grad: Tensor | None, p: Tensor) -> Tensor:
    return torch.zeros_like(p) if grad is None else grad


def _pergrad_diff(model, x, y, loss_fn, reference: dict[str, Tensor]) -> float | None:
    """pergrad's per-example gradients against the reference, or None if unsupported."""
    try:
        with PerExample(model, grads=True) as pe:
            result = pe.backward(loss_fn(model(x), y))
    except PergradError:
        return None
    worst = 0.0
    for name, ref in reference.items():
        scale = max(float(ref.abs().max()), 1e-300)
        worst = max(worst, float((result.grads[name] - ref).abs().max()) / scale)
    return worst
