"""nn.Linear with any number of leading dims: input (n, *, i), output (n, *, o).

The positions ``*`` are flattened into t; calls of a shared module are concatenated along t,
which makes the per-example piece the sum over calls and puts the cross terms into the norm.
The math is that of :mod:`._sequence`.

Where building the weight's per-example pieces ``P_j = Σ_t g_jt a_jtᵀ`` is faster than the
Gram form on top of autograd's weight gradient (timed once per shape, see
:func:`._sequence.build_in_backward`), or they are needed anyway (gradients, second moments),
they are built during the backward pass and the batch weight gradient is their sum, which
autograd then does not compute a second time: the norms cost only their squares. The pieces
are built in chunks of examples and reduced at once to norms (and second moments when asked
for), so no (n, o, i) tensor outlives the call's backward unless the per-example gradients
themselves are needed.
"""

from __future__ import annotations

from torch import Tensor, nn

from ._registry import Keep, Rule, register_rule
from ._sequence import bias_grads, build_in_backward, reduced_pieces, weight_grads
from .records import Dense, Outer, Record, Reduced


@register_rule(nn.Linear)
class LinearRule(Rule):
    """Weight (o, i): ``P_j = Σ_t g_jt a_jtᵀ``; bias (o,): ``Σ_t g_jt``."""

    flattens_positions = True

    def grads_in_backward(self, module, args, keep):
        x = args[0] if args else None  # an input passed by keyword: leave the weight to autograd
        if not isinstance(x, Tensor) or x.dim() < 3:
            return ()
        t = x.numel() // (x.shape[0] * module.in_features) if x.shape[0] else 0
        if t == 1:
            return ()
        # the Gram form's second moments and gradients materialise the pieces anyway
        if not (keep.grads or keep.second or build_in_backward(x, module.out_features)):
            return ()
        return ("weight",) if module.bias is None else ("weight", "bias")

    def backward_call(self, module, call, grad_output, keep: Keep):
        """The weight's pieces in chunks of examples that stay in cache while they are summed
        into the batch gradient and squared (and squared elementwise, for second moments), built
        into one reused scratch buffer (:func:`._sequence.reduced_pieces`); the bias's pieces
        ``Σ_t g_jt``."""
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
        grad, sq, second = reduced_pieces(a, g, keep.second)
        bias = bias_grads(g) if with_bias else None
        call.pieces["weight_sq"] = sq
        if second is not None:
            call.pieces["weight_second"] = second
        if bias is None:
            return {"weight": grad}
        call.pieces["bias"] = bias
        return {"weight": grad, "bias": bias.sum(0)}

    def records(self, module, calls):
        """Per call: an :class:`Outer` record ``(g, a)`` for the weight and the bias's pieces
        ``Σ_t g_jt``, or, where the backward pass built them, what it kept of the pieces."""
        n = calls[0].args[0].shape[0]
        out: dict[str, list[Record]] = {}
        for call in calls:
            a = call.args[0].reshape(n, -1, module.in_features)  # (n, t, i)
            g = call.grad_outputs[0].reshape(n, -1, module.out_features)  # (n, t, o)
            for name, record in position_records(module, a, g, n, call.pieces).items():
                out.setdefault(name, []).append(record)
        return out


def position_records(module: nn.Module, a: Tensor, g: Tensor, n: int, built: dict[str, Tensor]) -> dict[str, Record]:
    """The records of one call of a layer with a ``weight`` applied at every position and an
    optional ``bias``, trainable parameters only.

    Args:
        module: the layer.
        a: (n·G, t, i) inputs, G groups stacked along the weight's first axis.
        g: (n·G, t, o) output gradients.
        n: number of examples.
        built: what the backward pass kept of the pieces it built (``"weight"`` (n, *shape),
            or its reductions ``"weight_sq"`` (n,) and ``"weight_second"``; ``"bias"`` (n, G·o)).

    Returns:
        The weight's :class:`Outer` record ``P_j = Σ_t g_jt a_jtᵀ`` (or what was built), the
        bias's :class:`Dense` one ``Σ_t g_jt``.
    """
    out: dict[str, Record] = {}
    if module.weight.requires_grad:
        if "weight" in built:
            out["weight"] = Dense(built["weight"])
        elif "weight_sq" in built:
            out["weight"] = Reduced(built["weight_sq"], built.get("weight_second"))
        else:
            out["weight"] = Outer(g, a, groups=a.shape[0] // n)
    if getattr(module, "bias", None) is not None and module.bias.requires_grad:
        out["bias"] = Dense(built["bias"] if "bias" in built else bias_grads(g).reshape(n, -1))
    return out
