"""The reference: per-example gradients by torch.func.vmap(grad(functional_call)), float64 (one
example at a time where vmap cannot run the model)."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap


def per_example_loss(out: Tensor, target: Tensor) -> Tensor:
    """(n, ...) outputs -> (n,) losses: ½‖out − target‖² per example, a non-linear function."""
    n = out.shape[0]
    return 0.5 * (out - target).reshape(n, -1).square().sum(1)


def reference_grads(model: nn.Module, x: Tensor, target: Tensor) -> dict[str, Tensor]:
    """{name: (n, *p.shape)} gradients of each example's own loss, trainable parameters only."""
    params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    frozen = {k: p.detach() for k, p in model.named_parameters() if not p.requires_grad}
    buffers = dict(model.named_buffers())

    def loss(p, xj, tj):
        out = functional_call(model, {**p, **frozen, **buffers}, (xj.unsqueeze(0),))
        return per_example_loss(out, tj.unsqueeze(0))[0]

    with warnings.catch_warnings():
        # vmap over scaled_dot_product_attention loops over examples and says so; fine here
        warnings.filterwarnings("ignore", message="There is a performance drop")
        try:
            return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, target)
        except RuntimeError:  # data-dependent shapes (bags of examples' own lengths), ops vmap lacks (LSTM)
            pass
    each = [grad(loss)(params, x[j], target[j]) for j in range(x.shape[0])]  # one example at a time
    return {k: torch.stack([g[k] for g in each]) for k in params}


def rel_err(actual: Tensor, expected: Tensor) -> float:
    """Largest absolute difference over the largest absolute expected value."""
    scale = expected.abs().max().clamp_min(1e-300)
    return ((actual - expected).abs().max() / scale).item()
