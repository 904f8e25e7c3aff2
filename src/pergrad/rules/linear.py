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

from ._registry import Keep, flat_sq_norm, register_rule
from ._sequence import (
    Positions,
    WeightSharingRule,
    bias_grads,
    materialising_in_backward_is_cheaper,
    piece_chunks,
    row_sq_norms,
    weight_grads,
)

class Built(NamedTuple):
    """What the backward pass of a Linear's calls kept of the per-example pieces.

    Attributes:
        weight: (n, o, i) per-example pieces summed over calls, or None if only their
            reductions were kept (one call) or the weight is frozen.
        weight_sq: (n,) their squared norms, when ``weight`` is None.
        weight_second: (o, i) Σⱼ P_j², when ``weight`` is None and it was asked for.
        bias: (n, o) per-example bias pieces summed over calls, or None (no trainable bias).
    """

    weight: Tensor | None
    weight_sq: Tensor | None
    weight_second: Tensor | None
    bias: Tensor | None


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
        if not (keep.grads or keep.second or cheaper):
            return ()
        return ("weight",) if module.bias is None else ("weight", "bias")

    def backward_call(self, module, call, grad_output, keep: Keep):
        """The weight's pieces in chunks of examples that stay in cache while they are summed
        into the batch gradient and squared (and squared elementwise, for second moments), built
        into one reused scratch buffer; the bias's pieces ``Σ_t g_jt`` from the same chunk of ``g``."""
        n = grad_output.shape[0]
        a = call.args[0].reshape(n, -1, module.in_features)  # (n, t, i)
        g = grad_output.reshape(n, -1, module.out_features)  # (n, t, o)
        with_bias = module.bias is not None and module.bias.requires_grad
        if keep.grads or not module.weight.requires_grad:
            pieces = {"bias": bias_grads(g)} if with_bias else {}
            if module.weight.requires_grad:
                pieces["weight"] = weight_grads(a, g)
            call.pieces.update(pieces)
            return {name: piece.sum(0) for name, piece in pieces.items()}
        grad = a.new_zeros(module.weight.shape)
        sq = a.new_empty(n)
        second = a.new_zeros(module.weight.shape) if keep.second else None
        bias = g.new_empty(n, module.out_features) if with_bias else None
        for rows, pieces in piece_chunks(a, g):  # (c, o, i) each
            grad += pieces.sum(0)
            sq[rows] = row_sq_norms(pieces.view(pieces.shape[0], -1))
            if second is not None:
                second += pieces.square_().sum(0)
            if bias is not None:
                bias[rows] = bias_grads(g[rows])
        call.pieces["weight_sq"] = sq
        if second is not None:
            call.pieces["weight_second"] = second
        if bias is None:
            return {"weight": grad}
        call.pieces["bias"] = bias
        return {"weight": grad, "bias": bias.sum(0)}

    def prepare(self, module, calls):
        n = calls[0].args[0].shape[0]
        if not any(c.pieces for c in calls):
            a = [c.args[0].reshape(n, -1, module.in_features) for c in calls]
            g = [c.grad_outputs[0].reshape(n, -1, module.out_features) for c in calls]
            return Positions(a[0], g[0], n) if len(calls) == 1 else Positions(torch.cat(a, 1), torch.cat(g, 1), n)
        pieces = calls[0].pieces
        if len(calls) == 1 and "weight" not in pieces:  # reduced during the backward pass
            return Built(None, pieces.get("weight_sq"), pieces.get("weight_second"), pieces.get("bias"))
        weight = bias = None
        for c in calls:  # pieces of the calls the backward did not build them for (input by keyword)
            g = c.grad_outputs[0].reshape(n, -1, module.out_features)
            if module.weight.requires_grad:
                w = c.pieces.get("weight")
                w = weight_grads(c.args[0].reshape(n, -1, module.in_features), g) if w is None else w
                weight = w if weight is None else weight + w
            if module.bias is not None and module.bias.requires_grad:
                b = c.pieces["bias"] if "bias" in c.pieces else bias_grads(g)
                bias = b if bias is None else bias + b
        return Built(weight, None, None, bias)

    def per_example_grads(self, module, inputs):
        if isinstance(inputs, Positions):
            return super().per_example_grads(module, inputs)
        return self._each(module, inputs, lambda w: w, lambda b: b)

    def sq_norms(self, module, inputs):
        if isinstance(inputs, Positions):
            return super().sq_norms(module, inputs)
        return self._each(module, inputs, flat_sq_norm, flat_sq_norm, reduced=inputs.weight_sq)

    def second_moments(self, module, inputs):
        if isinstance(inputs, Positions):
            return super().second_moments(module, inputs)
        square_sum = lambda x: x.square().sum(0)  # noqa: E731
        return self._each(module, inputs, square_sum, square_sum, reduced=inputs.weight_second)

    @staticmethod
    def _each(module, inputs: Built, weight_fn, bias_fn, reduced: Tensor | None = None) -> dict[str, Tensor]:
        """``{"weight": reduced, or weight_fn((n, o, i) pieces), "bias": bias_fn((n, o) pieces)}``
        for the trainable parameters."""
        out = {}
        if module.weight.requires_grad:
            out["weight"] = reduced if inputs.weight is None else weight_fn(inputs.weight)
        if inputs.bias is not None:
            out["bias"] = bias_fn(inputs.bias)
        return out
