"""nn.Linear with any number of leading dims: input (n, *, i), output (n, *, o).

The positions ``*`` are flattened into t; calls of a shared module are concatenated along t,
which makes the per-example piece the sum over calls and puts the cross terms into the norm.
The math is that of :mod:`._sequence`.
"""

from __future__ import annotations

import torch
from torch import nn

from ._registry import register_rule
from ._sequence import Positions, WeightSharingRule


@register_rule(nn.Linear)
class LinearRule(WeightSharingRule):
    """Weight (o, i): ``P_j = Σ_t g_jt a_jtᵀ``; bias (o,): ``Σ_t g_jt``."""

    def prepare(self, module, calls):
        n = calls[0].args[0].shape[0]
        a = [c.args[0].reshape(n, -1, module.in_features) for c in calls]
        g = [c.grad_outputs[0].reshape(n, -1, module.out_features) for c in calls]
        if len(calls) == 1:
            return Positions(a[0], g[0], n)
        return Positions(torch.cat(a, 1), torch.cat(g, 1), n)
