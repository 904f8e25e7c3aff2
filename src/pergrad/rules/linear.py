"""nn.Linear with any number of leading dims: input (n, *, i), output (n, *, o).

The positions ``*`` are flattened into t; calls of a shared module are concatenated along t,
which makes the per-example piece the sum over calls and puts the cross terms into the norm.
The math is that of :mod:`._sequence`.

Where the weight's per-example pieces ``P_j = Σ_t g_jt a_jtᵀ`` are cheaper to materialise than
the Gram form (see :func:`._sequence.materialising_in_backward_is_cheaper`: from a few dozen
positions on), or needed anyway (gradients, second moments), they are built during the backward
pass and the batch weight gradient is their sum, which autograd then does not compute a second
time: the norms cost only their squares. The pieces are built in chunks of examples and reduced at once
to norms (and second moments when asked for), so no (n, o, i) tensor outlives the call's
backward unless the per-example gradients themselves are needed.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from ._registry import Keep, register_rule
from ._sequence import Positions, WeightSharingRule, bias_grads, materialising_in_backward_is_cheaper, row_sq_norms, weight_grads

CHUNK_ELEMENTS = 1 << 22  # per-example pieces built at once, at most (16 MiB in float32)


class Built(NamedTuple):
    """A Linear's captured calls, with what the backward pass kept of the weight's pieces.

    Attributes:
        positions: inputs and output gradients (for the bias).
        weight: (n, o, i) per-example pieces summed over calls, or None if only their
            reductions were kept.
        weight_sq: (n,) their squared norms, when ``weight`` is None.
        weight_second: (o, i) Σⱼ P_j², when ``weight`` is None and it was asked for.
    """

    positions: Positions
    weight: Tensor | None
    weight_sq: Tensor | None
    weight_second: Tensor | None


@register_rule(nn.Linear)
class LinearRule(WeightSharingRule):
    """Weight (o, i): ``P_j = Σ_t g_jt a_jtᵀ``; bias (o,): ``Σ_t g_jt``."""

    flattens_positions = True

    def grads_in_backward(self, module, args, keep):
        x = args[0] if args else None  # an input passed by keyword: leave the weight to autograd
        if not isinstance(x, Tensor) or x.dim() < 3:
            return ()
        t = x[0].numel() // module.in_features
        if t == 1:
            return ()
        # the Gram form's second moments and gradients materialise the pieces anyway
        cheaper = materialising_in_backward_is_cheaper(t, module.in_features, module.out_features)
        return ("weight",) if keep.grads or keep.second or cheaper else ()

    def backward_call(self, module, call, grad_output, keep: Keep):
        n = grad_output.shape[0]
        a = call.args[0].reshape(n, -1, module.in_features)  # (n, t, i)
        g = grad_output.reshape(n, -1, module.out_features)  # (n, t, o)
        if keep.grads:
            call.pieces["weight"] = weight_grads(a, g)
            return {"weight": call.pieces["weight"].sum(0)}
        grad = a.new_zeros(module.weight.shape)
        sq = a.new_empty(n)
        second = a.new_zeros(module.weight.shape) if keep.second else None
        chunk = max(1, CHUNK_ELEMENTS // module.weight.numel())
        for start in range(0, n, chunk):
            pieces = weight_grads(a[start : start + chunk], g[start : start + chunk])  # (c, o, i)
            grad += pieces.sum(0)
            sq[start : start + chunk] = row_sq_norms(pieces.reshape(pieces.shape[0], -1))
            if second is not None:
                second += pieces.square().sum(0)
        call.pieces["weight_sq"] = sq
        if second is not None:
            call.pieces["weight_second"] = second
        return {"weight": grad}

    def prepare(self, module, calls):
        n = calls[0].args[0].shape[0]
        a = [c.args[0].reshape(n, -1, module.in_features) for c in calls]
        g = [c.grad_outputs[0].reshape(n, -1, module.out_features) for c in calls]
        positions = Positions(a[0], g[0], n) if len(calls) == 1 else Positions(torch.cat(a, 1), torch.cat(g, 1), n)
        if not any(c.pieces for c in calls):
            return positions
        if len(calls) == 1 and "weight_sq" in calls[0].pieces:
            pieces = calls[0].pieces
            return Built(positions, None, pieces["weight_sq"], pieces.get("weight_second"))
        weight = sum(c.pieces["weight"] if c.pieces else weight_grads(a_c, g_c) for c, a_c, g_c in zip(calls, a, g))
        return Built(positions, weight, None, None)

    def per_example_grads(self, module, inputs):
        if isinstance(inputs, Positions):
            return super().per_example_grads(module, inputs)
        return {"weight": inputs.weight, **self._bias(module, inputs, lambda b: b)}

    def sq_norms(self, module, inputs):
        if isinstance(inputs, Positions):
            return super().sq_norms(module, inputs)
        weight_sq = inputs.weight_sq
        if weight_sq is None:
            weight_sq = row_sq_norms(inputs.weight.reshape(inputs.weight.shape[0], -1))
        return {"weight": weight_sq, **self._bias(module, inputs, row_sq_norms)}

    def second_moments(self, module, inputs):
        if isinstance(inputs, Positions):
            return super().second_moments(module, inputs)
        second = inputs.weight_second
        if second is None:
            second = inputs.weight.square().sum(0)
        return {"weight": second, **self._bias(module, inputs, lambda b: b.square().sum(0))}

    @staticmethod
    def _bias(module, inputs: Built, reduce) -> dict[str, Tensor]:
        """``{"bias": reduce((n, o) per-example bias gradients)}`` when the bias is trainable."""
        if module.bias is None or not module.bias.requires_grad:
            return {}
        return {"bias": reduce(bias_grads(inputs.positions.g))}
