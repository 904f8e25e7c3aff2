"""Parameters a module uses directly in its own forward: class tokens, position tables,
layer-scale vectors, RMSNorm weights, a Linear subclass that scales its weight, GPT-2's
``Conv1D``. This is the rule of every trainable module that has no registered rule.

While such a module runs its forward under capture, a torch function mode watches the
operations that take one of its own parameters ``p`` (or a tensor computed from ``p`` alone,
``r = f(p)``: a slice, a reshape, ``2 * p``). Where the operation treats examples
independently along the example axis, the mode gives the parameter that axis explicitly:

    P = p.expand(n, *p.shape)        # a view: no copy; autograd sums its gradient back into p

and runs the operation on ``vmap(f)(P)`` instead of ``r``. Each example's output then depends
on its own slice ``P[j]`` only, so the gradient autograd delivers to ``P`` during the ordinary
backward pass is, row by row, the per-example pieces ``∂L/∂P[j]`` (n, *p.shape) — for any
``f``, with no formula per operation. The output is the same tensor as before, so the model
computes exactly what it did.

Operations handled this way (the example axis is axis 0 of their other operands):
broadcasting arithmetic (``x * gamma``, ``x + pos_embed``), ``expand`` (``cls_token.expand(n,
-1, -1)``), the affine part of ``layer_norm`` / ``rms_norm`` / ``group_norm``, ``linear``,
``matmul`` / ``addmm`` / ``embedding`` with the parameter as weight. Two of them keep the
cheaper forms of the registered rules when the parameter itself is the weight: a linear map
records its input ``a`` and output gradient ``g`` (the norms by :mod:`._sequence`, never an
(n, o, i) tensor), an embedding its indices (rows summed per example, never (n, V, d)).
A flattened input ``(n·t, i)`` (``x.view(-1, i)``) is read as ``(n, t, i)``, examples first.

Any other operation on a parameter (a convolution with its own weight, an op mixing two
parameters) makes that call go through the torch.func rule (:mod:`.functional`): exact, and
the module's path says so.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import vmap
from torch.overrides import TorchFunctionMode

from ..axes import Axis, axis_of, examples_first
from . import _sequence as seq
from ._registry import Rule, on_grad, widen
from .embedding import lookup_rows
from .functional import FALLBACK
from .records import Dense, Outer, Record

__all__ = ["DIRECT", "DirectMode", "DirectRule"]


@dataclass
class _Derived:
    """A tensor computed from one parameter alone: ``value = f(param)``."""

    name: str
    param: Tensor
    f: Callable[[Tensor], Tensor] | None  # None: the parameter itself
    value: Tensor
    lookup: tuple[Tensor, int | None] | None = None  # value = F.embedding(index, param, padding_idx)


@dataclass
class Factored:
    """A use of the call's own parameters that the mode keeps in factored form, completed by
    the gradient of its output during the backward pass.

    Attributes:
        kind: "oi" (``y = a Wᵀ + b``, F.linear), "io" (``y = a W + b``: matmul, addmm, GPT-2's
            Conv1D) or "lookup" (``y = W[index]``, an embedding).
        x: (n, t, i) the input, or (n, t) the indices, examples first.
        weight, bias: parameter names (bias may be None).
        padding_idx: a lookup's row that gets no gradient, or None.
        g: (n, t, o) gradient of the reduced loss with respect to y, once the backward ran.
    """

    kind: str
    x: Tensor
    weight: str
    bias: str | None = None
    padding_idx: int | None = None
    g: Tensor | None = None

    def records(self) -> dict[str, Record]:
        """{name: record} of the parameters it uses (see :mod:`.records`)."""
        g = widen(self.g)
        if self.kind == "lookup":
            return {self.weight: lookup_rows(self.x, g, self.padding_idx)}
        a = widen(self.x)
        out: dict[str, Record] = {self.weight: Outer(g, a) if self.kind == "oi" else Outer(a, g)}
        if self.bias is not None:
            out[self.bias] = Dense(seq.bias_grads(g))
        return out


@dataclass
class DirectCall:
    """What the mode recorded during one call of a module.

    Attributes:
        dense: {name: (n, *p.shape)} per-example pieces delivered to the expanded parameters.
        records: linear maps and lookups kept in factored form (:class:`Factored`).
        unhandled: operations on a parameter the mode could not give an example axis (the
            call then goes through torch.func).
        ops: names of the operations handled.
        n: number of examples the call was watched for (None: not watched).
        shared_output: a description of an output computed from parameters alone that met
            the batch only in operations the mode cannot follow (which no rule can split), or None.
        without_examples: a call of a module with a registered rule whose input had no example
            axis (T5's relative-position buckets): its output is computed from the parameters
            alone, followed until it meets the batch.
        hooks: weak references to the gradient hooks the mode registered, which only the
            call's autograd graph holds (see :meth:`graph_alive`).
    """

    dense: dict[str, Tensor] = field(default_factory=dict)
    records: list[Factored] = field(default_factory=list)
    unhandled: list[str] = field(default_factory=list)
    ops: set[str] = field(default_factory=set)
    n: int | None = None
    shared_output: str | None = None
    without_examples: bool = False
    hooks: list[weakref.ref] = field(default_factory=list)

    def hooked(self, hook: Callable[[Tensor], None]) -> Callable[[Tensor], None]:
        """``hook``, about to be registered on the call's graph, remembered weakly."""
        self.hooks.append(weakref.ref(hook))
        return hook

    def graph_alive(self) -> bool:
        """Whether a gradient may still reach this call's pieces: some hook of its is alive."""
        return any(ref() is not None for ref in self.hooks)

    @property
    def reached(self) -> bool:
        """Whether a gradient reached any parameter's pieces (even where the module's output
        was modified in place and its own gradient hook never ran)."""
        return bool(self.dense) or any(r.g is not None for r in self.records)

    def path(self) -> str:
        """How this call's pieces are computed, in words."""
        if self.unhandled:
            return f"torch.func ({'; '.join(sorted(set(self.unhandled)))})"
        return f"direct ({', '.join(sorted(self.ops))})" if self.ops else "direct"


def _op_name(func) -> str:
    return getattr(func, "__name__", repr(func)).strip("_")


_ARITHMETIC = {
    f
    for name in ("add", "sub", "mul", "div", "true_divide", "addcmul", "addcdiv", "where", "lerp", "maximum", "minimum")
    for f in (getattr(torch, name, None), getattr(Tensor, name, None), getattr(Tensor, name + "_", None))
    if f is not None
} | {
    getattr(Tensor, f"__{p}{name}__")
    for name in ("add", "sub", "mul", "truediv")
    for p in ("", "r", "i")
    if hasattr(Tensor, f"__{p}{name}__")
}
# any other operation on a parameter alone (a slice, ``2 * p``, ``p.float()``, ``expand``) is
# followed as a derived tensor (see DirectMode._derive_or_give_up)


class DirectMode(TorchFunctionMode):
    """Active during one call of a module whose parameters are used directly.

    Args:
        params: {id(parameter): (local name, parameter)}, the module's own trainable ones.
        buffers: ids of the module's buffers (constants, unlike the inputs).
        n: number of examples of the forward in progress.
        record: where the call's pieces and records go.
        accounted_elsewhere: whether a use of a parameter, now, is accounted for by another
            module's rule (the parameter is also registered on a submodule whose forward is
            running): the mode then leaves it alone, so that every use counts once.
    """

    def __init__(
        self,
        params: dict[int, tuple[str, Tensor]],
        buffers: set[int],
        n: int,
        record: DirectCall,
        accounted_elsewhere: Callable[[Tensor], bool] = lambda p: False,
    ):
        super().__init__()
        self.params = params
        self.accounted_elsewhere = accounted_elsewhere
        self.buffers = buffers
        self.n = n
        self.record = record
        record.n = n
        self.derived: dict[int, _Derived] = {}
        self.expanded: dict[str, Tensor] = {}

    # --- tracking -------------------------------------------------------------------
    def _tracked(self, x: Any) -> _Derived | None:
        if not isinstance(x, Tensor):
            return None
        own = self.params.get(id(x))
        if own is not None and own[1] is x:
            return _Derived(own[0], x, None, x)
        found = self.derived.get(id(x))
        return found if found is not None and found.value is x else None

    def _batched(self, x: Tensor) -> bool:
        """Whether x may carry examples: it has an example axis (or lost one), or a gradient."""
        return x.requires_grad or axis_of(x) is not None

    def _expanded(self, name: str, param: Tensor) -> Tensor:
        """P = p.expand(n, *p.shape), one per parameter and call, hooked for its gradient."""
        if name not in self.expanded:
            big = param.unsqueeze(0).expand(self.n, *param.shape)
            if big.requires_grad:
                dense = self.record.dense
                big.register_hook(self.record.hooked(lambda grad: dense.__setitem__(name, grad)))
            self.expanded[name] = big
        return self.expanded[name]

    def _per_example(self, d: _Derived, rank: int, where: Axis) -> Tensor | None:
        """``vmap(f)(P)`` shaped to broadcast against operands of ``rank`` dims that hold their
        examples ``where`` (:class:`~pergrad.axes.Axis`); None where ``d.value`` cannot meet
        them there.

        A value that broadcasts along the example axis (size 1 there, or no such axis) gets
        each example's own copy there. A value of the operands' full size along it (a class
        token expanded to the batch, ``cls.expand(n, -1, -1)``) lines its rows up with the
        examples: example j's rows come from its own copy (the diagonal of ``vmap(f)(P)``).
        """
        value, n = d.value, self.n
        lead = rank - value.dim()  # value's axes are the operands' last ones
        if lead < 0:
            return None
        at = where.dim - lead  # the example axis among value's axes (negative: not one of them)
        rows = where.outer * n * where.inner
        if d.lookup is not None and (at < 0 or value.shape[at] == 1):
            return self._looked_up(d, rank, where, lead)
        big = self._expanded(d.name, d.param)
        out = big if d.f is None else vmap(d.f)(big)  # (n, *value.shape)
        if at >= 0 and value.shape[at] == rows:
            out = out.unflatten(at + 1, (where.outer, n, where.inner))
            out = torch.diagonal(out, dim1=0, dim2=at + 2).movedim(-1, at + 1).flatten(at, at + 2)
            return out.reshape((1,) * lead + tuple(value.shape))
        if at >= 0 and value.shape[at] != 1:
            return None
        if at >= 0:
            out = out.squeeze(at + 1)
        shape = [1] * rank
        for k, size in enumerate(value.shape):
            if k != at:
                shape[lead + k] = size
        out = out.reshape(n, *(size for k, size in enumerate(shape) if k != where.dim)).movedim(0, where.dim)
        if rows != n:
            out = out.unsqueeze(where.dim).unsqueeze(where.dim + 2)
            out = out.expand(*out.shape[: where.dim], where.outer, n, where.inner, *out.shape[where.dim + 3 :])
            out = out.flatten(where.dim, where.dim + 2)
        return out

    def _looked_up(self, d: _Derived, rank: int, where: Axis, lead: int) -> Tensor:
        """Rows of a table looked up by an index without examples (position ids made inside the
        model), meeting the batch: the index gets the example axis (``expand``, no copy) and the
        lookup runs again on it, recorded in factored form (looked-up rows, never (n, V, d))."""
        index, padding_idx = d.lookup
        index = index.reshape((1,) * lead + tuple(index.shape))
        shape = list(index.shape)
        shape[where.dim] = where.outer * self.n * where.inner
        index = index.expand(shape)
        y = F.embedding(index, d.param, padding_idx)
        record = Factored("lookup", _rows(self, index, where, None), d.name, padding_idx=padding_idx)
        if y.requires_grad:
            on_grad(
                y, self.record.hooked(lambda grad: setattr(record, "g", _rows(self, grad, where, d.param.shape[1])))
            )
            self.record.records.append(record)
        self.record.ops.add("embedding")
        return y

    # --- dispatch -------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        found = [(k, d) for k, a in enumerate(args) if (d := self._tracked(a)) is not None]
        found += [(k, d) for k, v in kwargs.items() if (d := self._tracked(v)) is not None]
        if not found:
            if _holds_own_parameter(self, args, kwargs):
                out = _cat(self, func, args, kwargs, found) if func in _JOINS else None
                if out is not None:
                    self.record.ops.add(_op_name(func))
                    return out
                self.record.unhandled.append(f"{_op_name(func)} on parameters passed in a list")
            return func(*args, **kwargs)
        if any(self.accounted_elsewhere(d.param) for _, d in found):
            return func(*args, **kwargs)  # inside a module whose own rule accounts for this use
        handler = _HANDLERS.get(func)
        out = handler(self, func, args, kwargs, found) if handler is not None else None
        if out is not None:
            self.record.ops.add(_op_name(func))
            return out
        return self._derive_or_give_up(func, args, kwargs, found)

    def _derive_or_give_up(self, func, args, kwargs, found):
        """An operation the handlers do not know: fine if it only reads the parameter's
        metadata or computes from that one parameter alone (with indices, buffers, or tensors
        that carry no examples); otherwise the call goes to torch.func."""
        out = func(*args, **kwargs)
        if not isinstance(out, Tensor) or not out.requires_grad:
            return out
        others = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor) and self._tracked(a) is None]
        names = {d.name for _, d in found}
        constant = all(not self._batched(o) or not o.is_floating_point() or id(o) in self.buffers for o in others)
        if len(found) == 1 and constant:
            ((k, d),) = found
            self.derived[id(out)] = _Derived(d.name, d.param, _compose(d.f, func, args, kwargs, k), out)
            return out
        self.record.unhandled.append(f"{_op_name(func)} on {sorted(names)}")
        return out


def _holds_own_parameter(mode: DirectMode, args, kwargs) -> bool:
    """Whether an operation takes one of the mode's parameters inside a list or tuple (as
    ``_VF.lstm`` takes an RNN's weights), where no handler can give it the example axis."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, (list, tuple)) and any(mode._tracked(x) is not None for x in a):
            return True
    return False


def _compose(f, func, args, kwargs, k):
    """The function t -> func(..., f(t) at position k, ...)."""

    def g(t):
        x = t if f is None else f(t)
        if isinstance(k, int):
            return func(*args[:k], x, *args[k + 1 :], **kwargs)
        return func(*args, **{**kwargs, k: x})

    return g


def _rank_and_batched(mode: DirectMode, tensors: list[Tensor]) -> tuple[int, Axis] | None:
    """The broadcast rank of the operation's untracked tensors and where, right-aligned to it,
    one of them holds its examples (:mod:`pergrad.axes`); None if none has examples there."""
    others = [t for t in tensors if mode._tracked(t) is None]
    if not others:
        return None
    rank = len(torch.broadcast_shapes(*(t.shape for t in others)))
    for t in others:
        s = axis_of(t)
        if isinstance(s, Axis) and t.shape[s.dim] == s.outer * mode.n * s.inner:
            return rank, s._replace(dim=s.dim + rank - t.dim())
    return None


def _substituted(mode, args, kwargs, found, rank: int, where: Axis):
    """args and kwargs with each tracked tensor given the example axis; None if one cannot be."""
    args, kwargs = list(args), dict(kwargs)
    for k, d in found:
        big = mode._per_example(d, rank, where)
        if big is None:
            return None
        if isinstance(k, int):
            args[k] = big
        else:
            kwargs[k] = big
    return args, kwargs


def _arithmetic(mode, func, args, kwargs, found):
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
    batched = _rank_and_batched(mode, tensors)
    if batched is None or any(isinstance(k, int) and k == 0 and _is_inplace(func) for k, _ in found):
        return None
    new = _substituted(mode, args, kwargs, found, *batched)
    return None if new is None else func(*new[0], **new[1])


def _attention(mode, func, args, kwargs, found):
    """``scaled_dot_product_attention`` with a bias computed from a parameter as its mask."""
    query = args[0] if args else kwargs.get("query")
    where = axis_of(query)
    if len(found) != 1 or found[0][0] not in (3, "attn_mask") or not isinstance(where, Axis):
        return None
    if where.dim >= query.dim() - 2:
        return None
    new = _substituted(mode, args, kwargs, found, query.dim(), where)
    return None if new is None else func(*new[0], **new[1])


def _cat(mode, func, args, kwargs, found):
    """``torch.cat``/``stack`` of tensors with examples and tensors computed from a parameter
    (a class token expanded to the batch, joined to the patch embeddings)."""
    tensors = args[0] if args else kwargs.get("tensors")
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    if not isinstance(tensors, (list, tuple)) or kwargs.keys() - {"tensors", "dim"}:
        return None
    batched = _rank_and_batched(mode, list(tensors))
    if batched is None:
        return None
    rank, where = batched
    if func is not torch.stack and dim % rank == where.dim:
        return None
    joined = [t if mode._tracked(t) is None else mode._per_example(mode._tracked(t), rank, where) for t in tensors]
    return None if any(t is None for t in joined) else func(joined, dim)


def _is_inplace(func) -> bool:
    name = getattr(func, "__name__", "")
    return name.endswith("_") and not name.startswith("__") or name.startswith("__i")


def _affine(mode, x: Tensor, channel_axis: int, weight, bias, normalised: Tensor):
    """``normalised * w + b`` with the tracked ones given the example axis."""
    rank, where = x.dim(), _examples_of(mode, x)
    if where is None or channel_axis == 1 and where != (0, 1, 1):
        return None

    def shaped(p):
        d = mode._tracked(p)
        if d is None:
            if p is None:
                return None
            shape = (1,) * channel_axis + tuple(p.shape) + (1,) * (rank - channel_axis - p.dim())
            return p.reshape(shape)
        if channel_axis == 1 and d.value.dim() == 1:  # (c,) -> (n, c, 1, …)
            big = mode._per_example(d, 2, where)
            return None if big is None else big.reshape(mode.n, -1, *(1,) * (rank - 2))
        return mode._per_example(d, rank, where)

    w, b = shaped(weight), shaped(bias)
    if (weight is not None and w is None) or (bias is not None and b is None):
        return None
    out = normalised if w is None else normalised * w
    return out if b is None else out + b


def _layer_norm(mode, func, args, kwargs, found):
    x, shape, weight, bias, eps = _bind(
        args, kwargs, ("input", "normalized_shape", "weight", "bias", "eps"), (None, 1e-5)
    )
    return _affine(mode, x, x.dim() - len(shape), weight, bias, F.layer_norm(x, shape, None, None, eps))


def _rms_norm(mode, func, args, kwargs, found):
    x, shape, weight, eps = _bind(args, kwargs, ("input", "normalized_shape", "weight", "eps"), (None,))
    return _affine(mode, x, x.dim() - len(shape), weight, None, F.rms_norm(x, shape, None, eps))


def _group_norm(mode, func, args, kwargs, found):
    x, groups, weight, bias, eps = _bind(
        args, kwargs, ("input", "num_groups", "weight", "bias", "eps"), (None, None, 1e-5)
    )
    return _affine(mode, x, 1, weight, bias, F.group_norm(x, groups, None, None, eps))


def _bind(args, kwargs, names, defaults):
    """Positional and keyword arguments of a functional call, in ``names`` order."""
    values = list(args) + [kwargs.get(name) for name in names[len(args) :]]
    first_default = len(names) - len(defaults)
    for k in range(first_default, len(names)):
        if values[k] is None and names[k] not in kwargs:
            values[k] = defaults[k - first_default]
    return values


def _examples_of(mode, x: Tensor) -> Axis | None:
    """Where x holds the forward pass's n examples, or None."""
    where = axis_of(x)
    if isinstance(where, Axis) and x.shape[where.dim] == where.outer * mode.n * where.inner:
        return where
    return None


def _rows(mode, x: Tensor, where: Axis, width: int | None) -> Tensor:
    """x (…, width), its examples ``where``, as (n, rows, width) (or (n, rows) for width None)."""
    first = examples_first(x, where)
    return first.reshape(mode.n, -1) if width is None else first.reshape(mode.n, -1, width)


def _linear(mode, func, args, kwargs, found):
    x, weight, bias = _bind(args, kwargs, ("input", "weight", "bias"), (None,))
    return _linear_map(mode, x, weight, bias, "oi")


def _linear_map(mode, x: Tensor, weight: Tensor, bias: Tensor | None, layout: str):
    """``x Wᵀ + b`` ("oi") or ``x W + b`` ("io") with W and/or b tracked."""
    dw, db = mode._tracked(weight), mode._tracked(bias)
    if dw is not None and mode._tracked(x) is not None or weight.dim() != 2:
        return None
    o, i = weight.shape if layout == "oi" else weight.shape[::-1]
    where = _examples_of(mode, x)
    if where is None or where.dim == x.dim() - 1 or x.shape[-1] != i:
        return None
    a = _rows(mode, x, where, i)
    if dw is not None and dw.f is None and (bias is None or db is not None and db.f is None):
        # the parameter itself: keep the factored form (a, g)
        y = F.linear(x, weight if layout == "oi" else weight.T, bias)
        record = Factored(layout, a.detach(), dw.name, None if bias is None else db.name)
        if y.requires_grad:
            on_grad(y, mode.record.hooked(lambda grad: setattr(record, "g", _rows(mode, grad, where, o))))
            mode.record.records.append(record)
        return y
    if dw is not None:
        big = mode._per_example(dw, 3, Axis(0))  # (n, o, i) or (n, i, o)
        if big is None or where[:2] != (0, 1):  # examples first (flattened or not): y as x's rows
            return None
        y = torch.bmm(a, big.transpose(1, 2) if layout == "oi" else big)
    else:
        y = torch.matmul(a, weight.T if layout == "oi" else weight)
    if y.shape != (*x.shape[:-1], o):
        y = y.reshape(*x.shape[:-1], o)
    if bias is None:
        return y
    b = mode._per_example(db, y.dim(), where) if db is not None else bias
    return None if b is None else y + b


def _matmul(mode, func, args, kwargs, found):
    x, weight = args[0], args[1]
    if len(args) != 2 or kwargs or mode._tracked(x) is not None:
        return None
    return _linear_map(mode, x, weight, None, "io")


def _addmm(mode, func, args, kwargs, found):
    bias, x, weight = args[:3]
    if len(args) != 3 or kwargs or mode._tracked(x) is not None:
        return None
    return _linear_map(mode, x, weight, bias, "io")


def _embedding(mode, func, args, kwargs, found):
    index, weight, padding_idx, max_norm = _bind(
        args, kwargs, ("input", "weight", "padding_idx", "max_norm"), (None, None)
    )
    d = mode._tracked(weight)
    if d is None or d.f is not None or max_norm is not None or kwargs.get("scale_grad_by_freq"):
        return None
    if padding_idx is not None and padding_idx < 0:
        padding_idx += weight.shape[0]
    where = None if mode.record.without_examples else _examples_of(mode, index)
    if where is None and axis_of(index) is None:  # looked up by positions only: followed until it meets the batch
        y = F.embedding(index, weight, padding_idx)
        mode.derived[id(y)] = _Derived(
            d.name, d.param, lambda t: F.embedding(index, t, padding_idx), y, lookup=(index, padding_idx)
        )
        return y
    if where is None:
        return None
    y = F.embedding(index, weight, padding_idx)
    record = Factored("lookup", _rows(mode, index, where, None), d.name, padding_idx=padding_idx)
    if y.requires_grad:
        on_grad(y, mode.record.hooked(lambda grad: setattr(record, "g", _rows(mode, grad, where, weight.shape[1]))))
        mode.record.records.append(record)
    return y


_HANDLERS = {
    **{f: _arithmetic for f in _ARITHMETIC},
    F.layer_norm: _layer_norm,
    F.rms_norm: _rms_norm,
    F.group_norm: _group_norm,
    F.linear: _linear,
    torch.matmul: _matmul,
    Tensor.matmul: _matmul,
    Tensor.__matmul__: _matmul,
    torch.mm: _matmul,
    torch.addmm: _addmm,
    F.embedding: _embedding,
    F.scaled_dot_product_attention: _attention,
}


_JOINS = {torch.cat, torch.concat, torch.stack}


class DirectRule(Rule):
    """The rule of a module whose own parameters its forward uses directly (see module doc).

    A call whose operations the mode could not follow is computed by the torch.func rule.
    """

    def example_axis(self, module):
        return None  # the mode met the examples wherever the operations had them

    def batch_size(self, module, call):
        record: DirectCall | None = call.pieces.get("direct")
        if record is None or record.unhandled or record.n is None:
            return FALLBACK.batch_size(module, call)
        return record.n

    def records(self, module, calls):
        """Per call: the pieces delivered to the expanded parameters (:class:`Dense`) and the
        factored records of its linear maps and lookups; torch.func's pieces for a call whose
        operations the mode could not follow."""
        shapes = {k: p.shape for k, p in self.parameters(module)}
        out: dict[str, list[Record]] = {}
        for call in calls:
            record: DirectCall | None = call.pieces.get("direct")
            if record is None or record.unhandled:
                found = {k: Dense(v) for k, v in FALLBACK._one_call(module, call).items()}
            else:
                found = {k: Dense(v.reshape(v.shape[0], *shapes[k])) for k, v in record.dense.items()}
                for factored in record.records:
                    if factored.g is not None:
                        for k, r in factored.records().items():
                            out.setdefault(k, []).append(r)
            for k, r in found.items():
                out.setdefault(k, []).append(r)
        return out


DIRECT = DirectRule()
