"""The averaging identity, checked against independent per-example gradients.

The claim per-example statistics rest on: the batch gradient is the average of per-example
gradients, each being what the example's gradient would be on its own,

    ∇θ (1/n) Σᵢ ℓᵢ(x₁…xₙ)  =  (1/n) Σᵢ ∇θ ℓᵢ(xᵢ alone).

The left side is autograd's gradient of the batch's mean loss; each term on the right is
autograd's gradient of example i's loss from a forward of example i alone (a batch of one, the
model in its current mode), so no pergrad rule is involved. The identity fails wherever examples
are coupled (BatchNorm in training mode, centring over the batch, a layer that mixes examples):
then the batch gradient is not an average of independent terms. pergrad's one-pass per-example
gradients are compared with the same independent references.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import PergradError
from ..per_example import PerExample
from .additivity import check_additivity

__all__ = ["IdentityReport", "check_identity"]


@dataclass(frozen=True)
class IdentityReport:
    """How closely the identity holds on one batch, and whether pergrad's result matches it.

    Attributes:
        max_abs_diff: max over entries of |mean of the independent per-example gradients −
            batch gradient| (inf where an example cannot be computed alone).
        max_rel_diff: the same over the largest |batch gradient| entry.
        pergrad_max_rel_diff: max |pergrad's one-pass per-example gradients − the independent
            ones| over the largest |independent| entry; None where there is nothing to compare
            (pergrad refused the model, or examples cannot be computed alone).
        n: examples in the batch.
        dtype: the dtype the check ran in.
        tolerance: the largest relative difference accepted (1e-10 for float64, 1e-4 otherwise).
        cause: why the identity does not hold (the culprits :func:`check_additivity` names, or
            the error of a forward of one example alone); None where it holds.
        pergrad_error: pergrad's error where it refused the model, else None.
        passed: both differences within the tolerance.
    """

    max_abs_diff: float
    max_rel_diff: float
    pergrad_max_rel_diff: float | None
    n: int
    dtype: torch.dtype
    tolerance: float
    cause: str | None
    pergrad_error: str | None

    @property
    def identity_holds(self) -> bool:
        """Whether the batch gradient is the mean of the independent per-example gradients."""
        return self.max_rel_diff <= self.tolerance

    @property
    def passed(self) -> bool:
        pergrad_ok = self.pergrad_max_rel_diff is not None and self.pergrad_max_rel_diff <= self.tolerance
        return self.identity_holds and pergrad_ok

    @property
    def explanation(self) -> str:
        if not self.identity_holds:
            return (
                f"The averaging identity does NOT hold on this batch of {self.n}: the mean of the "
                f"per-example gradients, each computed on its example alone, differs from the batch "
                f"gradient by {self.max_rel_diff:.3g} relative (> {self.tolerance:g}, {self.dtype}). "
                f"Per-example gradients and the statistics built on them are undefined for this model. "
                f"{self.cause}"
            )
        text = (
            f"The averaging identity holds on this batch of {self.n}: the mean of the per-example "
            f"gradients, each computed on its example alone, matches the batch gradient to "
            f"{self.max_rel_diff:.3g} relative ({self.dtype})."
        )
        if self.pergrad_error is not None:
            return text + f" But pergrad refused the model, so its one-pass result is unchecked: {self.pergrad_error}"
        verdict = "match" if self.passed else "do NOT match"
        return text + (
            f" pergrad's one-pass per-example gradients {verdict} them ({self.pergrad_max_rel_diff:.3g} relative)."
        )


def check_identity(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    *,
    dtype: torch.dtype | None = torch.float64,
    on_unsupported: str = "error",
) -> IdentityReport:
    """Compare the batch gradient and pergrad's per-example gradients with independent ones.

    The model is copied (the caller's weights, ``.grad`` and buffers are untouched) and cast
    to ``dtype`` (None keeps its own), as are floating inputs and targets. It runs in its
    current train/eval mode, both on the batch and on each example alone.

    Args:
        model: the model; examples along the first axis of ``x``.
        x: (n, ...) inputs.
        y: (n, ...) targets.
        loss_fn: ``loss_fn(outputs, y)`` -> (n,) one loss per example.
        dtype: the precision of the check.
        on_unsupported: passed to :class:`~pergrad.PerExample` for pergrad's one-pass result.

    Raises:
        ValueError: ``loss_fn`` does not return one loss per example.
    """
    original = model
    model = copy.deepcopy(model)
    if dtype is not None:
        model = model.to(dtype)
        x, y = (t.to(dtype) if t.is_floating_point() else t for t in (x, y))
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    n = x.shape[0]
    batch_grad = _grads(model, params, _losses(model, x, y, loss_fn).mean())
    model_dtype = next((p.dtype for p in model.parameters()), torch.get_default_dtype())
    tolerance = 1e-10 if model_dtype == torch.float64 else 1e-4
    try:
        alone = _independent_grads(model, params, x, y, loss_fn)
    except (RuntimeError, ValueError) as err:  # e.g. BatchNorm in training mode on a batch of one
        cause = f"A forward of one example alone fails in the model's current mode ({type(err).__name__}: {err})."
        cause += " " + _coupling(original, x, y, loss_fn)
        return IdentityReport(math.inf, math.inf, None, n, model_dtype, tolerance, cause, None)
    max_abs = _max_abs_diff({k: g.mean(0) for k, g in alone.items()}, batch_grad)
    max_rel = max_abs / max(_max_abs(batch_grad), 1e-300)
    pergrad_diff, pergrad_error = _pergrad_diff(model, x, y, loss_fn, alone, on_unsupported)
    cause = None if max_rel <= tolerance else _coupling(original, x, y, loss_fn)
    return IdentityReport(max_abs, max_rel, pergrad_diff, n, model_dtype, tolerance, cause, pergrad_error)


def _losses(model: nn.Module, x: Tensor, y: Tensor, loss_fn) -> Tensor:
    """(n,) per-example losses of a forward of ``x``, or a ValueError naming the fix."""
    losses = loss_fn(model(x), y)
    n = x.shape[0]
    if losses.shape != (n,):
        raise ValueError(
            f"loss_fn must return one loss per example, shape ({n},), got {tuple(losses.shape)}: use reduction='none'."
        )
    return losses


def _grads(model: nn.Module, params: dict[str, Tensor], loss: Tensor) -> dict[str, Tensor]:
    """{name: p.shape} autograd's gradient of a scalar loss; zeros for parameters it does not reach."""
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return {k: torch.zeros_like(p) if g is None else g for (k, p), g in zip(params.items(), grads, strict=True)}


def _independent_grads(model, params, x, y, loss_fn) -> dict[str, Tensor]:
    """{name: (n, *p.shape)} each example's gradient from a forward of that example alone."""
    per_example = [
        _grads(model, params, _losses(model, x[i : i + 1], y[i : i + 1], loss_fn)[0]) for i in range(x.shape[0])
    ]
    return {k: torch.stack([g[k] for g in per_example]) for k in params}


def _max_abs(tensors: dict[str, Tensor]) -> float:
    return max((float(t.abs().max()) for t in tensors.values() if t.numel()), default=0.0)


def _max_abs_diff(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> float:
    return _max_abs({k: actual[k] - expected[k] for k in expected})


def _pergrad_diff(
    model, x, y, loss_fn, alone: dict[str, Tensor], on_unsupported: str
) -> tuple[float | None, str | None]:
    """pergrad's per-example gradients against the independent ones (relative), or its error."""
    try:
        with PerExample(model, grads=True, on_unsupported=on_unsupported) as pe:
            result = pe.backward(_losses(model, x, y, loss_fn))
    except PergradError as err:
        return None, str(err)
    return _max_abs_diff(result.grads, alone) / max(_max_abs(alone), 1e-300), None


def _coupling(model, x, y, loss_fn) -> str:
    """What couples the examples, as :func:`check_additivity` finds it."""
    additivity = check_additivity(model, x, y, loss_fn)
    if additivity.culprits:
        return "Examples are coupled by " + " ".join(additivity.hints[c] for c in additivity.culprits)
    return (
        "No module or loss term that mixes examples was found; a random layer in training mode "
        "(Dropout) also changes the gradient between forwards: run the check in eval mode."
    )
