"""nn.Linear with any number of leading dims: input (n, *, i), output (n, *, o).

The positions ``*`` are flattened into t; calls of a shared module are concatenated along t,
which makes the per-example piece the sum over calls and puts the cross terms into the norm.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import _sequence as seq
from ._registry import Call, Rule, register_rule


def _stacked(module: nn.Linear, calls: list[Call]) -> tuple[Tensor, Tensor]:
    """All calls as one sequence: a (n, t, i), g (n, t, o)."""
    a = [c.args[0].reshape(c.args[0].shape[0], -1, module.in_features) for c in calls]
    g = [c.grad_outputs[0].reshape(c.args[0].shape[0], -1, module.out_features) for c in calls]
    if len(calls) == 1:
        return a[0], g[0]
    return torch.cat(a, 1), torch.cat(g, 1)


@register_rule(nn.Linear)
class LinearRule(Rule):
    """Weight (o, i): ``P_j = Σ_t g_jt a_jtᵀ``; bias (o,): ``Σ_t g_jt``."""

    def per_example_grads(self, module, calls):
        a, g = _stacked(module, calls)
        return seq.weight_and_bias(module, lambda: seq.weight_grads(a, g), lambda: seq.bias_grads(g))

    def sq_norms(self, module, calls):
        a, g = _stacked(module, calls)
        return seq.weight_and_bias(
            module, lambda: seq.weight_sq_norms(a, g), lambda: seq.bias_grads(g).square().sum(1)
        )

    def second_moments(self, module, calls):
        a, g = _stacked(module, calls)
        return seq.weight_and_bias(
            module, lambda: seq.weight_second_moment(a, g), lambda: seq.bias_grads(g).square().sum(0)
        )

