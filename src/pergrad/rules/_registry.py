"""The registry of per-layer rules, and the base class a rule implements.

A *rule* turns what one module saw during a forward and backward pass into per-example
quantities for that module's parameters. It is a stateless object: every method is a pure
function of the module (for its hyper-parameters and weights) and the captured calls.

Index letters used in every rule: ``n`` examples, ``t`` positions (sequence or spatial),
``i`` input features, ``o`` output features.

Scaling convention. A captured output gradient ``g`` is the gradient of the *reduced* loss
``L`` (mean or sum over examples), so a rule's per-example pieces ``P_j`` satisfy
``∇L = Σ_j P_j``. The engine rescales them into gradients of each example's own loss
(``∇ℓ_j = n·P_j`` for a mean, ``P_j`` for a sum); rules never see the reduction.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor, nn

from ..axes import Axis, State, axis_of

if TYPE_CHECKING:
    from .records import Record

_FIRST = Axis(0)

__all__ = ["Call", "Keep", "Layout", "Rule", "on_grad", "register_rule", "rule_for", "registered_rules", "widen"]


@dataclass
class Layout:
    """Where a call's tensors hold their examples (:mod:`pergrad.axes`), as followed through
    the forward pass: one state per positional input, keyword input, tensor output and
    exposed internal (None: no example axis)."""

    args: tuple[State, ...]
    kwargs: dict[str, State]
    outputs: list[State]
    internals: dict[str, State]

    @classmethod
    def of(cls, args: tuple, kwargs: dict, outputs: list[Tensor], internals: dict[str, Tensor]) -> Layout:
        return cls(
            tuple(axis_of(a) for a in args),
            {k: axis_of(v) for k, v in kwargs.items()},
            [axis_of(o) for o in outputs],
            {k: axis_of(v) for k, v in internals.items()},
        )

    def examples_first_already(self) -> bool:
        """Whether every tensor with examples holds them along axis 0, one row each (nothing to move)."""
        states = (*self.args, *self.kwargs.values(), *self.outputs, *self.internals.values())
        return all(s is None or s == _FIRST for s in states)

    @classmethod
    def examples_first(cls, call: Call) -> Layout:
        """Every tensor of the call with its examples along axis 0."""

        def first(x):
            return Axis(0) if isinstance(x, Tensor) and x.dim() > 0 else None

        return cls(
            tuple(first(a) for a in call.args),
            {k: first(v) for k, v in call.kwargs.items()},
            [first(g) for g in call.grad_outputs],
            {k: first(v) for k, v in call.internals.items()},
        )


@dataclass
class Call:
    """One call of a module inside one forward pass.

    Attributes:
        args: the positional arguments, tensors detached.
        kwargs: the keyword arguments, tensors detached.
        grad_outputs: one entry per tensor output of the call, the gradient of the reduced
            loss with respect to it, or ``None`` when no gradient reached that output.
        internals: tensors from inside the forward that the rule's
            :meth:`Rule.exposing_forward` exposed, detached, by name.
        internal_grads: the gradient of the reduced loss with respect to each internal
            tensor it reached, by name.
        pieces: what the rule kept from this call's backward pass
            (:meth:`Rule.backward_call`), by a key of the rule's choosing.
        layout: where its tensors hold their examples; None: along axis 0, all of them.
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    grad_outputs: list[Tensor | None] = field(default_factory=list)
    internals: dict[str, Tensor] = field(default_factory=dict)
    internal_grads: dict[str, Tensor] = field(default_factory=dict)
    pieces: dict[str, Tensor] = field(default_factory=dict)
    layout: Layout | None = None

    @property
    def reached(self) -> bool:
        """Whether any gradient reached this call's outputs (else it contributes zero)."""
        return any(g is not None for g in self.grad_outputs)

    def primary(self) -> tuple[Tensor | None, State]:
        """The first tensor input (positional, else by keyword) and where its examples are."""
        layout = self.layout or Layout.examples_first(self)
        for x, s in (
            *zip(self.args, layout.args, strict=True),
            *((v, layout.kwargs[k]) for k, v in self.kwargs.items()),
        ):
            if isinstance(x, Tensor):
                return x, s
        return None, None


class Keep(NamedTuple):
    """What a rule must keep from the backward pass besides squared norms.

    Attributes:
        grads: the per-example pieces themselves, as a :class:`~.records.Dense` record (asked
            for, or the parameter has other records to be added to them before squaring).
        second: the second moments Σⱼ P_j².
    """

    grads: bool
    second: bool


class Rule:
    """Per-example gradients of one module family.

    A rule implements one method, :meth:`records`: what each parameter's per-example pieces are,
    in factored form (:mod:`.records`). The engine derives norms, second moments and gradients
    from them, and adds the cross terms where a parameter has several records (a module called
    twice, weights tied across modules). The other methods have defaults; two optional fast
    paths (:meth:`grads_in_backward` with :meth:`backward_call`, and :meth:`exposing_forward`)
    let a rule do its work during the model's own passes.
    """

    #: Whether the rule also covers the parameters of the module's submodules
    #: (for modules that use their children's weights functionally, like MultiheadAttention).
    covers_submodules: bool = False

    #: Whether the module's computation is position-wise (every row of its input alone, along
    #: every axis but the feature axes), so that its calls are handed to the rule with their
    #: examples moved to axis 0 wherever they were: sequence-first (t, n, …), or flattened with
    #: positions (n·t, …) or (t·n, …). Other rules get their calls as captured, and a call whose
    #: examples are not along :meth:`example_axis` is refused.
    flattens_positions: bool = False

    def records(self, module: nn.Module, calls: list[Call]) -> dict[str, list[Record]]:
        """What the per-example pieces of each trainable parameter are, by local name.

        Args:
            module: the module (its hyper-parameters and weights).
            calls: every call of the module in one forward pass that a gradient reached,
                examples first, float16/bfloat16 tensors widened to float32.

        Returns:
            ``{name: [record, ...]}``: one or more records per parameter (one per call, or
            the calls' positions concatenated), whose pieces add up to ``∇L`` for that parameter.
        """
        raise NotImplementedError

    def check(self, module: nn.Module) -> str | None:
        """Return why the module, as configured now, has no per-example gradients, or None."""
        return None

    def example_axis(self, module: nn.Module) -> int | None:
        """The axis of the module's first input along which its computation treats rows as
        independent examples (the batch axis: 0 by default); None where the rule reads the
        examples' layout from the call itself."""
        return 0

    def batch_size(self, module: nn.Module, call: Call) -> int:
        """Number of examples in a call: those of its first tensor input, where they are."""
        x, state = call.primary()
        return state.examples(x) if isinstance(state, Axis) else x.shape[0]

    def parameters(self, module: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
        """The trainable parameters this rule computes, with names relative to ``module``."""
        for name, p in module.named_parameters(recurse=self.covers_submodules):
            if p.requires_grad:
                yield name, p

    def grads_in_backward(self, module: nn.Module, args: tuple, keep: Keep) -> tuple[str, ...]:
        """Local names of the parameters whose batch gradient this rule builds itself during
        the backward pass of a call with positional inputs ``args``, as the sum of per-example
        pieces it materialises, so that autograd does not compute that gradient a second time;
        ``keep`` says what the pieces will be needed for. Default: none. A rule that names some
        implements :meth:`backward_call`, and its module returns one tensor."""
        return ()

    def backward_call(self, module: nn.Module, call: Call, grad_output: Tensor, keep: Keep) -> dict[str, Tensor]:
        """During the backward pass of one call: the batch gradient ``{name: p.shape}`` of each
        parameter named by :meth:`grads_in_backward`, given the gradient of the reduced loss
        with respect to the call's output. What :meth:`records` will need of the per-example
        pieces goes into ``call.pieces`` (their reductions, or the pieces themselves where
        ``keep.grads`` asks for them), so that no piece outlives the call's backward unless needed."""
        raise NotImplementedError

    def exposing_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[Any, dict[str, Tensor]]:
        """The module's forward, in an equivalent form that also returns tensors computed
        inside it (``{name: tensor}``, in the graph) whose gradients the rule needs, so that
        it need not recompute them in the backward; ``{}`` where it has none for this call.
        Only rules that override this get it called, in place of the module's forward,
        while a :class:`~pergrad.PerExample` captures."""
        return type(module).forward(module, *args, **kwargs), {}


def on_grad(tensor: Tensor, hook) -> None:
    """Call ``hook(grad)`` with the gradient of the reduced loss with respect to ``tensor`` as it
    is now, during the backward pass.

    The hook goes on the node that made the tensor (``grad_fn``), not on the tensor: a caller
    that modifies the tensor in place afterwards (``out += residual``, as Falcon's decoder does)
    moves a tensor's own hooks away from this value, while the node still receives its
    gradient; where the tensor is a view of a whole tensor (F.linear's output for a sequence), an
    in-place op routes the gradient to the base's node instead, which then gets it. A leaf tensor
    gets an ordinary tensor hook.
    """
    node = tensor.grad_fn
    if node is None:
        tensor.register_hook(hook)
        return
    k = tensor.output_nr
    seen = [False]  # whether this backward pass reached ``node`` (reset by the base's node below)

    def prehook(grad_outputs):
        if grad_outputs[k] is not None:
            seen[0] = True
            hook(grad_outputs[k])

    node.register_prehook(prehook)
    base = tensor._base
    whole_view = base is not None and base.numel() == tensor.numel() and base.is_contiguous() and tensor.is_contiguous()
    if not whole_view or base.grad_fn is None:
        return
    # A view of a whole tensor (F.linear's (n, t, o) output of an (n·t, o) product): an in-place
    # op on it later routes the gradient around ``node``, to the node that made the base.
    base_k, shape = base.output_nr, tensor.shape

    def base_prehook(grad_outputs):
        if seen[0]:
            seen[0] = False
        elif grad_outputs[base_k] is not None:
            hook(grad_outputs[base_k].reshape(shape))

    base.grad_fn.register_prehook(base_prehook)


def widen(x: Any) -> Any:
    """A float16/bfloat16 tensor as float32 (autocast's activations and gradients), so that
    per-example sums and norms accumulate in float32; anything else unchanged."""
    if isinstance(x, Tensor) and x.dtype in (torch.float16, torch.bfloat16):
        return x.float()
    return x


_SCRATCH = threading.local()  # per thread: (device, dtype) -> flat tensor


def workspace(numel: int, like: Tensor) -> Tensor:
    """A flat scratch tensor of at least ``numel`` entries with ``like``'s dtype and device,
    reused by every call that asks on this thread (its contents are whatever the last user left).

    On CPU every large temporary is fresh memory from the system (page faults, zeroing) once it
    is freed; per-example pieces that are reduced at once are built here instead, in chunks of
    a bounded size (it stays as large as the largest request). A caller must be done with it
    before anything else may ask (true within one rule's method; on CUDA, kernels on one stream
    run in order).
    """
    cache = _SCRATCH.__dict__.setdefault("buffers", {})
    key = (like.device, like.dtype)
    buffer = cache.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = cache[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
    return buffer


_RULES: dict[type[nn.Module], Rule] = {}


def register_rule(module_type: type[nn.Module], rule: Rule | None = None, *, overwrite: bool = False):
    """Register the rule for a module class (and, through the MRO, its subclasses).

    Usable as a function, ``register_rule(MyLayer, MyRule())``, or as a class decorator on a
    :class:`Rule` subclass, ``@register_rule(MyLayer)``.

    Args:
        module_type: the ``nn.Module`` subclass the rule handles.
        rule: a :class:`Rule` instance; omitted when used as a decorator.
        overwrite: replace an existing rule for exactly this class instead of raising.

    Raises:
        ValueError: the class already has a rule and ``overwrite`` is False.
        TypeError: ``module_type`` is not an ``nn.Module`` subclass or ``rule`` not a Rule.
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"register_rule expects an nn.Module subclass, got {module_type!r}.")

    def add(r):
        instance = r() if isinstance(r, type) else r
        if not isinstance(instance, Rule):
            raise TypeError(f"A rule must be a pergrad.rules.Rule, got {type(instance).__name__}.")
        if module_type in _RULES and not overwrite:
            raise ValueError(
                f"{module_type.__name__} already has a rule ({type(_RULES[module_type]).__name__}); "
                "pass overwrite=True to replace it."
            )
        _RULES[module_type] = instance
        return r

    return add if rule is None else add(rule)


def rule_for(module: nn.Module) -> Rule | None:
    """The rule for a module: that of the first registered class along ``type(module).__mro__``,
    provided the module still runs that class's ``forward``.

    A rule knows a computation, not just a class: a subclass that overrides ``forward`` (timm's
    ``LayerNorm2d`` permutes, a Linear subclass may scale its weight) gets no inherited rule
    unless it is registered itself.
    """
    for cls in type(module).__mro__:
        if cls in _RULES:
            return _RULES[cls] if type(module).forward is cls.forward else None
    return None


def registered_rules() -> dict[type[nn.Module], Rule]:
    """A copy of the registry: module class -> rule."""
    return dict(_RULES)
