"""Per-example math for a weight applied at every position: ``y_t = W a_t`` (+ bias).

Shared by Linear (positions = leading dims after the first) and convolutions (positions =
output pixels after unfolding). Shapes: ``a`` (n, t, i) inputs, ``g`` (n, t, o) gradients of
the reduced loss with respect to the outputs. The per-example piece of the weight gradient is
``P_j = Σ_t g_jt a_jtᵀ`` (o, i); of the bias, ``Σ_t g_jt`` (o,).

Two ways to get ``‖P_j‖²``:
- materialise ``P_j`` and square it: about n·t·i·o multiply-adds, n·o·i memory;
- the Gram form ``‖P_j‖² = Σ_{t,s} (a_t·a_s)(g_t·g_s) = ⟨A Aᵀ, G Gᵀ⟩``: about n·t²·(i+o)
  multiply-adds, n·t² memory, no outer product built. With t = 1 it is ``‖a‖²‖g‖²``.
:func:`weight_sq_norms` takes whichever is cheaper for the shapes at hand.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def gram_is_cheaper(t: int, i: int, o: int) -> bool:
    """Whether the Gram form costs fewer multiply-adds than materialising, per example."""
    return t * (i + o) < i * o


def weight_grads(a: Tensor, g: Tensor) -> Tensor:
    """(n, t, i), (n, t, o) -> (n, o, i): ``P_j = Σ_t g_jt a_jtᵀ``."""
    return torch.bmm(g.transpose(1, 2), a)


def weight_sq_norms(a: Tensor, g: Tensor) -> Tensor:
    """(n, t, i), (n, t, o) -> (n,): ``‖Σ_t g_jt a_jtᵀ‖²``, by the cheaper of two exact forms."""
    n, t, i = a.shape
    o = g.shape[2]
    if t == 1:
        return a.reshape(n, i).square().sum(1) * g.reshape(n, o).square().sum(1)
    if gram_is_cheaper(t, i, o):
        gram_a = torch.bmm(a, a.transpose(1, 2))  # (n, t, t)
        gram_g = torch.bmm(g, g.transpose(1, 2))  # (n, t, t)
        return (gram_a * gram_g).sum((1, 2))
    return weight_grads(a, g).square().sum((1, 2))


def weight_second_moment(a: Tensor, g: Tensor) -> Tensor:
    """(n, t, i), (n, t, o) -> (o, i): ``Σ_j P_j²`` (elementwise square)."""
    if a.shape[1] == 1:
        return g[:, 0].square().T @ a[:, 0].square()
    return weight_grads(a, g).square().sum(0)


def bias_grads(g: Tensor) -> Tensor:
    """(n, t, o) -> (n, o): ``Σ_t g_jt``."""
    return g.sum(1)


def weight_and_bias(module: nn.Module, weight, bias) -> dict[str, Tensor]:
    """Evaluate the weight and bias thunks for the parameters that are trainable."""
    out = {}
    if module.weight.requires_grad:
        out["weight"] = weight()
    if module.bias is not None and module.bias.requires_grad:
        out["bias"] = bias()
    return out
