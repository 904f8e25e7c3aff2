"""Where the examples are in every tensor of a forward pass: followed, never guessed.

The model's inputs hold their examples along a declared axis (the first, by convention, or
the second for ``batch_first=False``). From there, a torch function mode (:class:`Tracker`)
follows that axis through every operation of the forward pass: elementwise arithmetic with
broadcasting, ``transpose``/``permute``, ``reshape``/``view`` (merging examples with positions
and splitting them again), ``cat``, ``stack``, indexing, reductions over other axes, matrix
products, and the layers' functional forms. Each tensor it sees carries its state:

- :class:`Axis` ``(dim, outer, inner)``: its axis ``dim`` holds ``outer · n · inner`` rows,
  example ``j`` owning the rows ``o·n·inner + j·inner + r`` (``o < outer``, ``r < inner``).
  ``Axis(0)`` is the usual examples-first layout; ``x.view(n * t, d)`` gives ``Axis(0, 1, t)``;
  a sequence-first ``(t, n, d)`` flattened gives ``Axis(0, t, 1)``.
- :class:`Lost`: an operation this module does not model took a tensor with examples, or one
  mixed them (a mean over the batch); where it was lost is kept for the error message.
- no state: no example axis (parameters, constants, tensors computed from them alone).

A module's rule then reads each call in the layout it was actually given (see
:func:`examples_first`), and a call whose examples were lost raises instead of guessing.
Shapes are never evidence: a tensor's size along an axis says nothing about what the axis holds.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["Axis", "Lost", "Tracker", "axis_of", "examples_first", "mark", "new_forward"]


class Axis(NamedTuple):
    """The example axis of a tensor: ``dim`` holds ``outer · n · inner`` rows, examples in the
    middle factor (see the module doc)."""

    dim: int
    outer: int = 1
    inner: int = 1

    def examples(self, x: Tensor) -> int:
        """n: the number of examples of ``x`` along this axis."""
        return x.shape[self.dim] // (self.outer * self.inner)


@dataclass(frozen=True)
class Lost:
    """The example axis was lost: ``op`` took a tensor with examples and ``why``."""

    op: str
    why: str = "pergrad does not follow the example axis through it"

    def describe(self) -> str:
        return f"{self.op} ({self.why})"


State = Axis | Lost | None

# id(tensor) -> (weak reference, state) for the forward pass in progress: kept beside the
# tensors, not on them, so that nothing of pergrad's travels with a tensor that is saved or copied
_STATES: dict[int, tuple[weakref.ref, State]] = {}


def new_forward() -> None:
    """Forget every state: called once the backward of a forward pass has been measured (a
    tensor kept across steps, a cache, has none in the next)."""
    _STATES.clear()


def axis_of(x: Any) -> State:
    """The state of ``x`` in the forward pass in progress (None: no example axis)."""
    entry = _STATES.get(id(x))
    return entry[1] if entry is not None and entry[0]() is x else None


def mark(x: Tensor, state: State) -> Tensor:
    """Give ``x`` its state (an :class:`Axis`, say where a custom layout holds its examples);
    returns ``x``."""
    _STATES[id(x)] = (weakref.ref(x), state)
    return x


def examples_first(x: Tensor, state: Axis) -> Tensor:
    """``x`` viewed with its examples along a new first axis: (n, …), the other axes in order,
    ``outer`` and ``inner`` where the example axis was."""
    if state == (0, 1, 1):
        return x
    dim = state.dim
    if state.outer != 1 or state.inner != 1:
        x = x.unflatten(dim, (state.outer, state.examples(x), state.inner))
        dim += 1
    return x.movedim(dim, 0)


class Tracker(TorchFunctionMode):
    """Active while a model's forward runs under capture: tags the output of every operation
    that takes a tagged tensor (see the module doc)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **kwargs) if kwargs else func(*args)
        # fast exits first: most calls return no tensor (shape, dim, requires_grad) or take no
        # tensor with examples (parameters, constants); those cost one scan of the arguments
        if isinstance(out, Tensor):
            pass
        elif not (isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor)):
            if func is _SETITEM and _tagged(args, kwargs):
                _setitem(*args[:3])
            return out
        if not _tagged(args, kwargs):
            return out
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)
        if handler is None and _name(func) in _EXISTING:
            return out
        try:
            state = handler(func, args, kwargs, out) if handler is not None else Lost(_name(func))
        except (IndexError, TypeError, ValueError, RuntimeError) as err:  # arguments it did not expect
            state = Lost(_name(func), f"its arguments could not be read: {err}")
        if isinstance(out, Tensor):
            mark(out, state)
        else:
            states = state if isinstance(state, list) else [state] * len(out)
            for o, s in zip(out, states, strict=True):
                if isinstance(o, Tensor):
                    mark(o, s)
        return out


_SETITEM = Tensor.__setitem__

# properties that return a tensor that exists already, whose state is its own
_EXISTING = {"Tensor._base", "Tensor.grad", "Tensor._grad"}


def _name(func) -> str:
    """``Tensor.add``, ``torch.cat``, ``F.linear``: how an operation is called, for messages."""
    name = _NAMES.get(func)
    if name is None:
        name = _describe(func)
        if len(_NAMES) < 4096:  # operations made on the fly (a partial per call) are not kept
            _NAMES[func] = name
    return name


_NAMES: dict = {}  # func -> its name, for the operations met so far


def _describe(func) -> str:
    name = getattr(func, "__name__", None) or repr(func)
    owner = getattr(func, "__objclass__", None) or getattr(func, "__self__", None)
    if name == "__get__":  # a property: Tensor.T
        name, owner = func.__self__.__name__, torch.Tensor
    if isinstance(owner, type) and issubclass(owner, torch._C.TensorBase):
        return f"Tensor.{name}"
    return f"{'F' if getattr(func, '__module__', '') == 'torch.nn.functional' else 'torch'}.{name}"


def _tagged(args, kwargs) -> bool:
    """Whether an argument (or a tensor in a list or tuple argument) has a state."""
    if not _STATES:
        return False
    for a in args:
        if _has_state(a):
            return True
    if kwargs:
        for a in kwargs.values():
            if _has_state(a):
                return True
    return False


def _has_state(a) -> bool:
    if isinstance(a, Tensor):
        entry = _STATES.get(id(a))
        return entry is not None and entry[1] is not None and entry[0]() is a
    if isinstance(a, (list, tuple)):
        return any(isinstance(b, Tensor) and axis_of(b) is not None for b in a)
    return False


def _tensors(args, kwargs) -> list[Tensor]:
    out = []
    for a in (*args, *kwargs.values()):
        if isinstance(a, Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(b for b in a if isinstance(b, Tensor))
    return out


def _arg(args, kwargs, pos: int, name: str, default=None):
    if len(args) > pos:
        return args[pos]
    return kwargs.get(name, default)


def _dims(dim, ndim: int) -> list[int] | None:
    """Normalised dims of a ``dim`` argument (int, sequence); None for all of them."""
    if dim is None:
        return None
    dims = [dim] if isinstance(dim, int) else list(dim)
    return [d % ndim if ndim else 0 for d in dims]


def _source(args, kwargs) -> tuple[Tensor, State]:
    x = args[0] if args else kwargs.get("input", kwargs.get("self"))
    return x, axis_of(x)


# --- handlers: (func, args, kwargs, out) -> state of the output(s) ---------------------------


def _broadcast(func, args, kwargs, out) -> State:
    """Elementwise with broadcasting: tagged operands must agree once right-aligned; a batch of
    one broadcast against more rows carries no example axis."""
    first = out if isinstance(out, Tensor) else out[0]
    rank, found = first.dim(), None
    for x in _tensors(args, kwargs):
        s = axis_of(x)
        if s is None:
            continue
        if isinstance(s, Lost):
            return s
        d = s.dim + rank - x.dim()
        if x.shape[s.dim] == 1 and first.shape[d] != 1:
            continue
        a = Axis(d, s.outer, s.inner)
        if found is None:
            found = a
        elif found != a:
            return Lost(_name(func), f"tensors with examples along different axes meet ({found} and {a})")
    return found


def _same(func, args, kwargs, out) -> State:
    """An operation that keeps its first operand's layout (``to``, ``clone``, dropout)."""
    return _source(args, kwargs)[1]


def _untagged(func, args, kwargs, out) -> State:
    """A new tensor that only takes its operand's shape or options (``zeros_like``)."""
    return None


def _along(pos: int, default=None, name: str = "dim") -> Callable:
    """An operation along one axis that keeps the others (softmax, cumsum, sort): fine unless
    that axis holds the examples."""

    def handler(func, args, kwargs, out):
        x, s = _source(args, kwargs)
        if not isinstance(s, Axis):
            return s
        dims = _dims(_arg(args, kwargs, pos, name, default), x.dim())
        if dims is None or s.dim in dims:
            return Lost(_name(func), "it runs along the examples' axis, mixing them")
        return s

    return handler


def _reduce(pos: int, name: str = "dim") -> Callable:
    """A reduction over some axes (sum, mean, amax): fine unless the examples are among them."""

    def handler(func, args, kwargs, out):
        x, s = _source(args, kwargs)
        if len(args) > pos and isinstance(args[pos], Tensor):  # torch.max(a, b): elementwise
            return _broadcast(func, args, kwargs, out)
        if not isinstance(s, Axis):
            return s
        dims = _dims(_arg(args, kwargs, pos, name), x.dim())
        if dims is None or s.dim in dims:
            return Lost(_name(func), "it reduces over the examples, mixing them")
        first = out if isinstance(out, Tensor) else out[0]
        kept = first.dim() == x.dim()
        return s if kept else s._replace(dim=s.dim - sum(d < s.dim for d in dims))

    return handler


def _trailing(count: Callable[[Tensor, tuple, dict], int]) -> Callable:
    """An operation over a tensor's last ``count`` axes (a norm, a pool, a convolution), the
    leading ones kept as they are."""

    def handler(func, args, kwargs, out):
        x, s = _source(args, kwargs)
        if not isinstance(s, Axis):
            return s
        if s.dim >= x.dim() - count(x, args, kwargs):
            return Lost(_name(func), "it mixes along the examples' axis")
        return s._replace(dim=s.dim + out.dim() - x.dim()) if isinstance(out, Tensor) else s

    return handler


def reshape_axis(before: tuple[int, ...], after: tuple[int, ...], s: Axis) -> Axis | None:
    """The example axis of a tensor of shape ``before`` viewed as ``after`` (same elements in
    the same order); None if the examples end up split across axes.

    In flat order example j's elements are ``o·(n·A) + j·A + r`` with ``o < B`` and ``r < A``
    (B = outer · the sizes before the axis, A = inner · the sizes after it). They stay on one
    axis k of ``after`` when the sizes after k (S) divide A and axis k covers n·A/S whole rows.
    """
    n = before[s.dim] // (s.outer * s.inner)
    rows_after = s.inner * math.prod(before[s.dim + 1 :])
    suffix = math.prod(after)
    for k, size in enumerate(after):
        suffix //= size if size else 1
        if size and rows_after % suffix == 0 and (suffix * size) % (n * rows_after) == 0:
            inner = rows_after // suffix
            return Axis(k, size // (n * inner), inner)
    return None


def _reshape(func, args, kwargs, out) -> State:
    x, s = _source(args, kwargs)
    if not isinstance(s, Axis):
        return s
    found = reshape_axis(tuple(x.shape), tuple(out.shape), s) if x.numel() == out.numel() else None
    return found or Lost(_name(func), "it splits the examples' rows across axes")


_PROBE_SIZES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)


def _permute(func, args, kwargs, out) -> State:
    """transpose, permute, movedim, ``.T``: the same call on a meta tensor of distinct sizes
    says where each axis went."""
    x, s = _source(args, kwargs)
    if not isinstance(s, Axis):
        return s
    probe = torch.empty(_PROBE_SIZES[: x.dim()], device="meta")
    moved = func(probe, *args[1:], **kwargs)
    return s._replace(dim=list(moved.shape).index(_PROBE_SIZES[s.dim]))


def _expand(func, args, kwargs, out) -> State:
    x, s = _source(args, kwargs)
    if not isinstance(s, Axis):
        return s
    d = s.dim + out.dim() - x.dim()
    if out.shape[d] != x.shape[s.dim]:  # one example's rows copied to many: no example axis
        return None
    return s._replace(dim=d)


def _repeat(func, args, kwargs, out) -> State:
    x, s = _source(args, kwargs)
    if not isinstance(s, Axis):
        return s
    d = s.dim + out.dim() - x.dim()
    return s._replace(dim=d) if out.shape[d] == x.shape[s.dim] else Lost(_name(func), "it repeats the examples")


def _take(pos: int, removes: bool, name: str = "dim", default=0) -> Callable:
    """select/narrow/index_select/split/chunk/unbind along ``dim``: fine unless that axis holds
    the examples (or takes all of them)."""

    def handler(func, args, kwargs, out):
        x, s = _source(args, kwargs)
        if not isinstance(s, Axis):
            return s
        dim = _dims(_arg(args, kwargs, pos, name, default), x.dim())[0]
        first = out if isinstance(out, Tensor) else out[0]
        if dim == s.dim:
            whole = not removes and first.shape[dim] == x.shape[dim] and (isinstance(out, Tensor) or len(out) == 1)
            return s if whole else Lost(_name(func), "it takes part of the examples")
        return s._replace(dim=s.dim - 1) if removes and dim < s.dim else s

    return handler


def _cat(stack: bool) -> Callable:
    def handler(func, args, kwargs, out):
        tensors = list(_arg(args, kwargs, 0, "tensors"))
        dim = _arg(args, kwargs, 1, "dim", 0) % out.dim()
        found = None
        for x in tensors:
            s = axis_of(x)
            if isinstance(s, Lost):
                return s
            if s is None:
                continue
            d = s.dim + (1 if stack and dim <= s.dim else 0)
            if not stack and d == dim:
                return Lost(_name(func), "it joins tensors along the examples' axis")
            a = s._replace(dim=d)
            if found not in (None, a):
                return Lost(_name(func), f"tensors with examples along different axes meet ({found} and {a})")
            found = a
        return found

    return handler


def _gather(func, args, kwargs, out) -> State:
    """``gather(x, dim, index)``: the output is shaped as the index; its examples are the
    index's, or x's where the index keeps all of x's rows along x's example axis."""
    x, dim, index = args[0], _arg(args, kwargs, 1, "dim"), _arg(args, kwargs, 2, "index")
    sx, si = axis_of(x), axis_of(index)
    for s in (sx, si):
        if isinstance(s, Lost):
            return s
    if isinstance(sx, Axis) and (sx.dim == dim % x.dim() or index.shape[sx.dim] != x.shape[sx.dim]):
        return Lost(_name(func), "it gathers along the examples' axis")
    if None not in (sx, si) and sx != si:
        return Lost(_name(func), "tensors with examples along different axes meet")
    return si or sx


def _pad(func, args, kwargs, out) -> State:
    x, s = _source(args, kwargs)
    if not isinstance(s, Axis):
        return s
    pad = list(_arg(args, kwargs, 1, "pad"))
    k = x.dim() - 1 - s.dim  # the example axis counted from the last
    if 2 * k + 1 < len(pad) and (pad[2 * k] or pad[2 * k + 1]):
        return Lost(_name(func), "it pads the examples' axis")
    return s


def _linear(func, args, kwargs, out) -> State:
    """``F.linear(x, W, b)``: rows of x stay rows; its last axis is contracted."""
    x, s = _source(args, kwargs)
    weight = _arg(args, kwargs, 1, "weight")
    if axis_of(weight) is not None or axis_of(_arg(args, kwargs, 2, "bias")) is not None:
        return _broadcast_matmul(func, x, weight, out, transposed=True)
    if not isinstance(s, Axis):
        return s
    return s if s.dim < x.dim() - 1 else Lost(_name(func), "it contracts the examples' axis")


def _matmul(func, args, kwargs, out) -> State:
    return _broadcast_matmul(func, args[0], args[1], out, transposed=False)


def _addmm(func, args, kwargs, out) -> State:
    product = _broadcast_matmul(func, args[1], args[2], out, transposed=False)
    if isinstance(product, Lost):
        return product
    bias = _broadcast(func, (args[0],), {}, out)
    if isinstance(bias, Lost) or None not in (bias, product) and bias != product:
        return Lost(_name(func), "tensors with examples along different axes meet")
    return product or bias


def _broadcast_matmul(func, a: Tensor, b: Tensor, out: Tensor, transposed: bool) -> State:
    """a @ b (or a @ bᵀ): batch axes broadcast; a's rows and b's columns stay; the
    contracted axis must not hold examples."""
    states = []
    for which, x in (("a", a), ("b", b)):
        s = axis_of(x)
        if s is None:
            continue
        if isinstance(s, Lost):
            return s
        from_end = s.dim - x.dim()
        if x.dim() == 1:
            return Lost(_name(func), "it contracts the examples' axis")
        kept = {"a": -2, "b": -2 if transposed else -1}[which]
        if from_end in (-1, -2) and from_end != kept:
            return Lost(_name(func), "it contracts the examples' axis")
        if from_end == kept:
            d = out.dim() - (2 if which == "a" else 1) if b.dim() > 1 else out.dim() - 1
        else:
            d = out.dim() + from_end
        states.append(s._replace(dim=d))
    if len(set(states)) > 1:
        return Lost(_name(func), "tensors with examples along different axes meet")
    return states[0] if states else None


def _einsum(func, args, kwargs, out) -> State:
    equation = args[0]
    operands = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
    spec = equation.replace(" ", "")
    inputs, _, output = spec.partition("->")
    terms = inputs.split(",")
    if not _ or "..." in spec:
        return Lost(_name(func), "an implicit output or an ellipsis")
    found = None
    for term, x in zip(terms, operands, strict=False):  # (a malformed equation fails in torch)
        s = axis_of(x)
        if isinstance(s, Lost):
            return s
        if s is None:
            continue
        letter = term[s.dim]
        if letter not in output:
            return Lost(_name(func), "it contracts the examples' axis")
        a = s._replace(dim=output.index(letter))
        if found not in (None, a):
            return Lost(_name(func), "tensors with examples along different axes meet")
        found = a
    return found


def _embedding(func, args, kwargs, out) -> State:
    index, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
    if axis_of(weight) is not None:
        return Lost(_name(func), "a table with examples")
    return axis_of(index)


def _embedding_bag(func, args, kwargs, out) -> State | list[State]:
    """Bags are examples: the rows of a 2-D input, or, for a flat input, the bags its offsets
    cut out of it (the layer's own definition), in order."""
    index = args[0]
    s = axis_of(index) if index.dim() == 2 else Axis(0)
    if isinstance(s, Axis) and s != (0, 1, 1):
        return Lost(_name(func), "bags are taken along the first axis")
    return [s] + [None] * (len(out) - 1) if isinstance(out, (tuple, list)) else s


def _batch_norm(func, args, kwargs, out) -> State:
    x, s = _source(args, kwargs)
    if _arg(args, kwargs, 5, "training", False):
        return Lost(_name(func), "batch statistics mix the examples")
    return s if not isinstance(s, Axis) or s.dim != 1 else Lost(_name(func), "its channel axis holds the examples")


def _attention(func, args, kwargs, out) -> State:
    """scaled_dot_product_attention: the batch axes (all but the last two) are kept."""
    found = None
    for x in _tensors(args, kwargs):
        s = axis_of(x)
        if isinstance(s, Lost):
            return s
        if s is None or x.shape[s.dim] == 1 and out.shape[s.dim + out.dim() - x.dim()] != 1:
            continue
        if s.dim >= x.dim() - 2:
            return Lost(_name(func), "it attends along the examples' axis")
        a = s._replace(dim=s.dim + out.dim() - x.dim())
        if found not in (None, a):
            return Lost(_name(func), "tensors with examples along different axes meet")
        found = a
    return found


def _mha(func, args, kwargs, out) -> list[State]:
    """F.multi_head_attention_forward: query (L, n, E) -> output (L, n, E), weights (n, L, S)."""
    query = args[0] if args else kwargs["query"]
    s = axis_of(query)
    if isinstance(s, Lost) or s is None:
        return [s, s]
    if query.dim() != 3 or s != (1, 1, 1):
        return [Lost(_name(func), "its batch axis is the second")] * 2
    return [s, Axis(0)]


def _recurrent(func, args, kwargs, out) -> list[State]:
    """_VF.lstm/gru/rnn_*(input, hx, weights, bias, layers, dropout, train, bidirectional,
    batch_first): output in the input's layout, hidden states (layers, n, h)."""
    x, s = _source(args, kwargs)
    if isinstance(args[1], Tensor) and args[1].dim() == 1:  # packed: (data, batch_sizes, ...)
        return [Lost(_name(func), "a packed sequence")] * len(out)
    batch_first = bool(args[-1])
    if isinstance(s, Axis) and s != (0 if batch_first else 1, 1, 1):
        s = Lost(_name(func), f"its batch axis is {'the first' if batch_first else 'the second'}")
    hidden = Axis(1) if isinstance(s, Axis) else s
    return [s] + [hidden] * (len(out) - 1)


def _getitem(func, args, kwargs, out) -> State:
    return _index_state(args[0], axis_of(args[0]), args[1], out, _name(func))


def _index_state(x: Tensor, s: State, index, out: Tensor, name: str) -> State:
    """``x[index]`` where x has state ``s``: basic indexing keeps or shifts the example axis (a
    full slice of it, or of other axes); integer-tensor indices move the indexed axes (NumPy's
    rules); an index tensor with examples gives them to the result."""
    items = list(index) if isinstance(index, tuple) else [index]
    count = sum(1 for i in items if i is not None and i is not Ellipsis and not _is_mask(i)) + sum(
        i.dim() for i in items if _is_mask(i)
    )
    if any(i is Ellipsis for i in items):
        k = next(k for k, i in enumerate(items) if i is Ellipsis)
        items[k : k + 1] = [slice(None)] * (x.dim() - count)
    advanced = [k for k, i in enumerate(items) if isinstance(i, (Tensor, list))]
    if any(_is_mask(items[k]) for k in advanced):
        return Lost(name, "a boolean mask") if s is not None else None
    in_dim = out_dim = 0
    result: State = None
    adv_out = None  # where the advanced indices' axes go
    contiguous = advanced == list(range(advanced[0], advanced[-1] + 1)) if advanced else True
    adv_rank = 0
    if advanced:
        shapes = [torch.as_tensor(items[k]).shape if isinstance(items[k], list) else items[k].shape for k in advanced]
        adv_rank = len(torch.broadcast_shapes(*shapes))
        adv_out = None if contiguous else 0
        out_dim = 0 if contiguous else adv_rank
    for k, item in enumerate(items):
        if item is None:
            out_dim += 1
            continue
        if k in advanced:
            if adv_out is None:
                adv_out = out_dim
                out_dim += adv_rank
            if isinstance(s, Axis) and in_dim == s.dim:
                result = _arange_index(x, items, advanced, k, s, adv_out, out, name)
                if isinstance(result, Lost):
                    return result
            in_dim += 1
            continue
        if isinstance(s, Axis) and in_dim == s.dim:
            if isinstance(item, int):
                return Lost(name, "it takes one example")
            if out.shape[out_dim] != x.shape[in_dim]:
                return Lost(name, "it takes part of the examples")
            result = s._replace(dim=out_dim)
        if isinstance(item, slice):
            out_dim += 1
        in_dim += 1
    if isinstance(s, Axis) and s.dim >= in_dim:  # an axis after the indexed ones
        result = s._replace(dim=s.dim - in_dim + out_dim)
    elif isinstance(s, Lost):
        return s
    for k in advanced:  # index tensors that carry examples
        i = items[k]
        si = axis_of(i) if isinstance(i, Tensor) else None
        if isinstance(si, Lost):
            return si
        if isinstance(si, Axis):
            a = si._replace(dim=adv_out + si.dim + adv_rank - i.dim())
            if result not in (None, a):
                return Lost(name, "tensors with examples along different axes meet")
            result = a
    return result


def _is_mask(i) -> bool:
    return isinstance(i, Tensor) and i.dtype == torch.bool


def _arange_index(x, items, advanced, k, s: Axis, adv_out: int, out: Tensor, name: str) -> State:
    """The example axis indexed by an integer tensor: kept only where that index is, by value,
    0, 1, …, n−1 along one of the result's axes (``logits[torch.arange(n), last]``)."""
    index = items[k]
    if not isinstance(index, Tensor) or axis_of(index) is not None or s != (s.dim, 1, 1):
        return Lost(name, "it picks examples by index")
    shapes = [items[j].shape if isinstance(items[j], Tensor) else torch.as_tensor(items[j]).shape for j in advanced]
    shape = torch.broadcast_shapes(*shapes)
    full = index.expand(shape)
    n = x.shape[s.dim]
    for d, size in enumerate(shape):
        if size == n:
            along = torch.arange(n, device=index.device).reshape([-1 if j == d else 1 for j in range(len(shape))])
            if torch.equal(full, along.expand(shape)):
                return Axis(adv_out + d)
    return Lost(name, "it picks examples by index")


def _setitem(x: Tensor, index, value) -> None:
    """``x[index] = value``: x takes the value's example axis, which must be where x's own is
    (if it has one); the rows it does not write are constants."""
    sx, sv = axis_of(x), axis_of(value)
    if sv is None or isinstance(sx, Lost):
        return
    if isinstance(sv, Lost):
        mark(x, sv)
        return
    view = x[index]
    written = sv._replace(dim=sv.dim + view.dim() - value.dim())
    candidates = [sx] if sx is not None else [Axis(d, sv.outer, sv.inner) for d in range(x.dim())]
    for s in candidates:
        if _index_state(x, s, index, view, "Tensor.__setitem__") == written:
            mark(x, s)
            return
    mark(x, Lost("Tensor.__setitem__", "values with examples are written along another axis"))


# --- the table ---------------------------------------------------------------------------

_POINTWISE = """abs absolute neg negative exp exp2 log log2 log10 log1p expm1 sqrt rsqrt sin cos tan
asin acos atan sinh cosh tanh asinh acosh atanh sigmoid logit relu relu6 gelu silu mish softplus
elu selu celu leaky_relu hardtanh hardswish hardsigmoid logsigmoid softsign tanhshrink threshold
hardshrink softshrink erf erfc erfinv pow float_power add sub subtract mul multiply div divide
true_divide floor_divide remainder fmod atan2 clamp clip clamp_min clamp_max where masked_fill lerp
maximum minimum fmax fmin addcmul addcdiv sign sgn reciprocal square eq ne lt le gt ge greater less
equal not_equal greater_equal less_equal logical_not logical_and logical_or logical_xor bitwise_and
bitwise_or bitwise_xor bitwise_not isnan isinf isfinite isposinf isneginf nan_to_num round floor
ceil trunc frac copysign hypot xlogy heaviside prelu rrelu copy_ fill_ zero_ masked_fill_
positive conj real imag angle polar complex view_as_real view_as_complex""".split()
_DUNDER = "add sub mul truediv floordiv mod pow matmul and or xor lshift rshift".split()
_COMPARE = "eq ne lt le gt ge neg pos abs invert".split()
_SAME = """to type type_as float double half bfloat16 int long bool short byte char cpu cuda
contiguous clone detach detach_ requires_grad_ dropout dropout1d dropout2d dropout3d alpha_dropout
feature_alpha_dropout bucketize pin_memory""".split()
_LIKE = """zeros_like ones_like empty_like full_like rand_like randn_like randint_like new_zeros
new_ones new_empty new_full new_tensor""".split()
_RESHAPE = "view reshape view_as reshape_as flatten unflatten squeeze unsqueeze ravel _unsafe_view".split()
_PERMUTE = "transpose swapaxes swapdims t permute movedim moveaxis adjoint".split()
_ALONG = {  # name: (position of dim, its default)
    "softmax": (1, None), "log_softmax": (1, None), "softmin": (1, None), "cumsum": (1, None),
    "cumprod": (1, None), "logcumsumexp": (1, None), "cummax": (1, None), "cummin": (1, None),
    "sort": (1, -1), "argsort": (1, -1), "topk": (2, -1), "kthvalue": (2, -1), "glu": (1, -1),
    "normalize": (2, 1), "flip": (1, None), "diff": (2, -1), "gumbel_softmax": (3, -1),
    "renorm": (2, None),
}  # fmt: skip
_ALONG_NAMES = {"flip": "dims"}
_REDUCE = {  # name: position of dim
    "sum": 1, "mean": 1, "nansum": 1, "nanmean": 1, "prod": 1, "amax": 1, "amin": 1, "max": 1,
    "min": 1, "argmax": 1, "argmin": 1, "std": 1, "var": 1, "std_mean": 1, "var_mean": 1,
    "logsumexp": 1, "all": 1, "any": 1, "count_nonzero": 1, "median": 1, "nanmedian": 1,
    "mode": 1, "aminmax": 1, "norm": 2, "vector_norm": 2,
}  # fmt: skip
_TAKE = {  # name: (position of dim, whether the axis is removed, its default)
    "select": (1, True, 0), "unbind": (1, True, 0), "narrow": (1, False, 0),
    "index_select": (1, False, 0), "split": (2, False, 0), "chunk": (2, False, 0),
    "tensor_split": (2, False, 0), "split_with_sizes": (2, False, 0), "unfold": (1, False, 0),
}  # fmt: skip


def _owners():
    return (torch, Tensor, F, torch.special, torch.linalg, torch.nn.functional)


def _functions(names) -> list:
    """Every callable of those names on torch, Tensor and torch.nn.functional, with in-place
    and reflected forms."""
    found = []
    for name in names:
        for owner in _owners():
            for variant in (name, name + "_", f"__{name}__", f"__r{name}__", f"__i{name}__"):
                f = getattr(owner, variant, None)
                if callable(f) and f not in found:
                    found.append(f)
    return found


def _table() -> dict:
    table: dict = {F.unfold: _trailing(lambda x, a, k: x.dim() - 1)}  # im2col, not Tensor.unfold

    def add(names, handler):
        for f in _functions(names if isinstance(names, list) else [names]):
            table.setdefault(f, handler)

    for name, (pos, default) in _ALONG.items():
        add(name, _along(pos, default, _ALONG_NAMES.get(name, "dim")))
    for name, pos in _REDUCE.items():
        add(name, _reduce(pos))
    for name, (pos, removes, default) in _TAKE.items():
        add(name, _take(pos, removes, "dim" if name != "unfold" else "dimension", default))
    add(_POINTWISE + _DUNDER + _COMPARE, _broadcast)
    add(_SAME, _same)
    add(_LIKE, _untagged)
    add(_RESHAPE, _reshape)
    add(_PERMUTE, _permute)
    for prop in ("T", "mT", "H", "mH"):
        table[getattr(Tensor, prop).__get__] = _permute
    for prop in ("data", "real", "imag"):
        table[getattr(Tensor, prop).__get__] = _same
    add(["expand", "expand_as", "broadcast_to"], _expand)
    add(["repeat"], _repeat)
    add(["cat", "concat", "concatenate"], _cat(stack=False))
    add(["stack"], _cat(stack=True))
    add(["pad"], _pad)
    add(["gather", "take_along_dim"], _gather)
    add(["linear"], _linear)
    add(["matmul", "mm", "bmm"], _matmul)
    add(["addmm", "baddbmm"], _addmm)
    add(["einsum"], _einsum)
    table[F.embedding] = _embedding
    table[F.embedding_bag] = _embedding_bag
    add(["__getitem__"], _getitem)
    add(["scaled_dot_product_attention"], _attention)
    add(["multi_head_attention_forward"], _mha)
    add(["triu", "tril"], _trailing(lambda x, a, k: 2))
    add(
        ["layer_norm", "native_layer_norm", "rms_norm"],
        _trailing(lambda x, a, k: len(_as_shape(_arg(a, k, 1, "normalized_shape")))),
    )
    add(["group_norm", "instance_norm"] + [f"conv{d}d" for d in (1, 2, 3)] + [f"conv_transpose{d}d" for d in (1, 2, 3)],
        _trailing(lambda x, a, k: x.dim() - 1))  # fmt: skip
    add(["batch_norm"], _batch_norm)
    for d in (1, 2, 3):
        pools = [f"{p}_pool{d}d" for p in ("max", "avg", "adaptive_max", "adaptive_avg", "lp")]
        add(pools + [f"{p}_pool{d}d_with_indices" for p in ("max", "adaptive_max")], _trailing(_last(d)))
    add(["interpolate", "upsample", "upsample_nearest", "upsample_bilinear"], _trailing(lambda x, a, k: x.dim() - 2))
    add(["pixel_shuffle", "pixel_unshuffle"], _trailing(lambda x, a, k: 3))
    add(["one_hot"], _same)  # a new last axis
    for name in ("lstm", "gru", "rnn_tanh", "rnn_relu"):
        f = getattr(torch._VF, name, None)
        if f is not None:
            table[f] = _recurrent
    return table


def _last(count: int) -> Callable:
    """For :func:`_trailing`: a fixed number of trailing axes."""
    return lambda x, args, kwargs: count


def _as_shape(shape) -> tuple:
    return (shape,) if isinstance(shape, int) else tuple(shape)


_HANDLERS = _table()
