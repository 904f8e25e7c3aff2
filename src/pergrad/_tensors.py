"""Flattening and squared norms of named tensors (parameters, gradients), and a gradient adder, written once.

Index letters: n examples, D the total number of entries of the tensors taken together.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

__all__ = ["adder", "flatten", "sq_norms"]


def flatten(tensors: Iterable[Tensor], per_example: bool = False) -> Tensor:
    """The tensors' entries one after another, in iteration order.

    Args:
        tensors: shapes (*s_k) each, or (n, *s_k) each with ``per_example``.
        per_example: keep the leading example axis.

    Returns:
        (D,), or (n, D) with ``per_example``; D = Σ_k numel(s_k).
    """
    if per_example:
        return torch.cat([t.reshape(t.shape[0], -1) for t in tensors], dim=1)
    return torch.cat([t.reshape(-1) for t in tensors])


def sq_norms(tensors: Mapping[str, Tensor | None], zero: Tensor | None) -> dict[str, Tensor]:
    """{name: ‖t‖²} as 0-dim tensors (``zero`` where the tensor is None; it may be None when no
    tensor is), with one multi-tensor norm kernel for all of them; computed in each tensor's dtype."""
    present = [name for name, t in tensors.items() if t is not None]
    norms = torch._foreach_norm([tensors[name] for name in present]) if present else []
    squared = dict(zip(present, torch.stack(norms).square().unbind() if present else [], strict=True))
    return {name: squared.get(name, zero) for name in tensors}


def adder(total: Tensor):
    """A gradient hook (``p.register_hook``) adding each backward's gradient of a parameter into
    ``total``: what the backward computed, before any clipping or averaging over workers."""

    def add(grad: Tensor) -> None:
        total.add_(grad.detach())

    return add
