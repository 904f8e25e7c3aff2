"""Hooks that capture, per module and per call, the input activations and output gradients.

The :class:`Capture` owns every hook and every saved tensor, and clears them: nothing is
stored on the modules. A forward hook on each *target* module (one whose trainable
parameters a rule computes) saves the call's inputs and registers tensor hooks on its
outputs; those receive the gradient of the reduced loss during the backward pass.
"""

from __future__ import annotations

import copy
import functools
import inspect
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from . import axes
from .axes import Axis, Lost, Tracker, axis_of, mark
from .errors import CaptureError, ExampleCouplingError, UnsupportedModuleError
from .rules import FALLBACK, Call, FunctionalRule, Keep, Layout, Rule, on_grad, rule_for, widen
from .rules.direct import DIRECT, DirectCall, DirectMode, DirectRule
from .rules.functional import output_tensors

__all__ = ["Capture", "Target", "rule_of_calls"]

_ON_UNSUPPORTED = ("auto", "fallback", "error")


@dataclass
class Target:
    """A module whose trainable parameters a rule computes.

    Attributes:
        path: the module's name in ``model.named_modules()`` ("" for the model itself).
        module: the module.
        rule: its rule.
        param_names: local parameter name -> name in ``model.named_parameters()``.
        calls: the calls captured since the last backward.
        anchors: one per call, weak references to the gradient hooks of its outputs and internals
            (or to its rule's gradient-building function), which only the call's autograd graph
            holds: all dead once the graph was dropped.
        internals: what the rule's exposing forward returned for the call in progress.
        param_ids: ids of those parameters.
        shared: whether one of its parameters is also used by another module (tied weights).
        detached: parameters swapped for detached copies during the call in progress.
    """

    path: str
    module: nn.Module
    rule: Rule
    param_names: dict[str, str]
    calls: list[Call]
    anchors: list[tuple[weakref.ref, ...]] = field(default_factory=list)
    internals: dict[str, Tensor] = field(default_factory=dict)
    param_ids: frozenset[int] = frozenset()
    shared: bool = False
    detached: dict[str, nn.Parameter] = field(default_factory=dict)
    slot: _Slot | None = None  # where the call in progress gets its gradient-building function
    modes: list[tuple[DirectMode, DirectCall]] = field(default_factory=list)
    last_path: str | None = None  # of the latest call that took the direct path

    def describe(self) -> str:
        return f"{type(self.module).__name__} at '{self.path or '<model>'}'"

    def keep(self, call: Call, hooks: list[Callable]) -> None:
        """Hold ``call`` until the next backward, or until its graph is gone: until none of
        ``hooks`` (gradient hooks that its graph holds, and nothing else) is alive."""
        self.calls.append(call)
        self.anchors.append(tuple(weakref.ref(h) for h in hooks))

    def drop_abandoned(self) -> None:
        """Forget the calls whose graphs were dropped before any backward reached them (a
        validation pass run with gradients on), and the tensors they saved: no gradient hook of
        theirs, nor of their direct path's, is alive, so none can reach them any more."""
        alive = [
            k
            for k, (call, refs) in enumerate(zip(self.calls, self.anchors, strict=True))
            if _may_be_reached(call, refs)
        ]
        if len(alive) == len(self.calls):
            return
        self.calls[:] = [self.calls[k] for k in alive]
        self.anchors[:] = [self.anchors[k] for k in alive]

    def path_taken(self) -> str:
        """How this module's per-example gradients are computed (see :attr:`Capture.paths`)."""
        if self.rule is FALLBACK:
            return "torch.func"
        if self.rule is not DIRECT:
            rule = f"rule {type(self.rule).__name__}"
            return rule if self.last_path is None else f"{rule}; {self.last_path} for calls without an example axis"
        return self.last_path or "direct"


class _Hook:
    """One of the capture's hooks as registered on a module: ``hook`` run with torch functions
    dispatched straight to torch. pergrad's own operations (reading shapes, detaching,
    registering gradient hooks) are then not followed by the forward pass's
    :class:`~pergrad.axes.Tracker` nor watched by a direct mode, which would cost a Python call
    each and learn nothing; a tensor a hook hands back to the forward pass is marked explicitly.

    A copy of the module gets :func:`_inert` in its place: ``copy.deepcopy`` of a hooked model
    (an EMA or teacher model, a best-so-far snapshot) runs as a plain model and holds nothing of
    the capture's, and ``torch.save`` of the whole model pickles.
    """

    __slots__ = ("hook",)

    def __init__(self, hook: Callable):
        self.hook = hook

    def __call__(self, *args, **kwargs):
        if torch.compiler.is_compiling():  # traced by dynamo, which handles the modes itself
            return self.hook(*args, **kwargs)
        with torch._C.DisableTorchFunction():
            return self.hook(*args, **kwargs)

    def __deepcopy__(self, memo) -> Callable:
        return _inert

    def __reduce__(self):
        return _inert_hook, ()


def _inert(*args, **kwargs) -> None:
    """What a copy of a hooked module gets for each of the capture's hooks: nothing happens."""


def _inert_hook() -> Callable:
    """:func:`_inert`, as an unpickled copy of a hooked module gets it."""
    return _inert


def _detached(x: Any) -> Any:
    return x.detach() if isinstance(x, Tensor) else x


class Capture:
    """Finds the target modules of a model, hooks them, and holds what the hooks saw.

    Where the examples are (see :mod:`pergrad.axes`): a forward pass starts when a hooked module
    (the model, or any module that holds a target) is called while none runs: its tensor inputs
    hold their examples along ``0 if batch_first else 1``, and a :class:`~pergrad.axes.Tracker`
    follows that axis until the call returns. A framework that calls a child of the model
    (Lightning's ``training_step`` calling ``self.net(x)``), or several children in one step,
    starts one such pass per call; a tensor passed from one to the next keeps its axis.

    Args:
        model: the model.
        on_unsupported: "error" raises for a trainable module without a rule; "fallback"
            computes such a module alone with torch.func.
        batch_first: whether the inputs of the model (of whichever hooked module is called
            first) hold their examples along their first axis; False: the second (PyTorch's
            sequence-first layout, (t, n, …)).
        example_axes: {module path: axis} where a module's tensor inputs hold their examples,
            declared for a module whose inputs come out of operations pergrad does not follow.

    Raises:
        UnsupportedModuleError: a module with trainable parameters and no rule, under "error".
        ValueError: an unknown ``on_unsupported`` or a path of ``example_axes`` not in the model.
    """

    def __init__(self, model: nn.Module, on_unsupported: str = "auto", batch_first: bool = True,
                 example_axes: dict[str, int] | None = None):  # fmt: skip
        if on_unsupported not in _ON_UNSUPPORTED:
            raise ValueError(
                f"on_unsupported must be one of {', '.join(map(repr, _ON_UNSUPPORTED))}, got {on_unsupported!r}."
            )
        modules = dict(model.named_modules())
        unknown = sorted(set(example_axes or {}) - set(modules))
        if unknown:
            raise ValueError(
                f"example_axes names {unknown}, not modules of the model; paths are those of model.named_modules()."
            )
        self.targets = _targets(model, on_unsupported)
        # watched for a change of mind: the targets and their hooks cover the parameters trainable now
        self._frozen = [(name, p) for name, p in model.named_parameters() if not p.requires_grad]
        #: a trainable parameter put into the model since (a new head, an adapter), by path; None
        self.added: str | None = None
        self._registrations = _watch_registrations(self, modules, {id(p) for p in model.parameters()})
        self.keep = Keep(grads=False, second=False)
        self.n_forward: int | None = None  # examples of the forward pass in progress
        self.input_axis = 0 if batch_first else 1
        self._paused = False
        # a backward not run by PerExample.backward: this is called once at its end
        self.on_external_backward: Callable[[], None] | None = None
        self.own_backward = False  # PerExample.backward is running its own backward
        self._end_queued = False
        self._entry: nn.Module | None = None  # the hooked module whose call started the forward pass in progress
        self._tracker: Tracker | None = None
        self._lingering: list[tuple[DirectMode, Target]] = []  # modes kept past their module's call
        self._running: list[Target] = []  # the targets whose forward is running, innermost last
        self._handles = self._attach(model, modules, example_axes or {})
        self._exposing = [t for t in self.targets if type(t.rule).exposing_forward is not Rule.exposing_forward]
        for t in self._exposing:
            _EXPOSING[id(t.module)] = (self, t)
            t.module.forward = _ExposingForward(t.module)

    def _attach(self, model: nn.Module, modules: dict[str, nn.Module], example_axes: dict[str, int]) -> list:
        """Register the hooks: a forward pass may start at the model, at every module that holds
        a target (the targets too), and at those with declared axes; one pre-hook and one hook
        per module."""
        handles: list = []
        declared = {id(modules[path]): axis for path, axis in example_axes.items()}
        holders = {id(model)} | set(declared)
        for t in self.targets:
            holders.update(id(modules[p]) for p in _ancestors(t.path))
        targets = {id(t.module): t for t in self.targets}
        for module in modules.values():
            t, axis = targets.get(id(module)), declared.get(id(module))
            if t is not None:
                # after the module's other pre-hooks (FSDP2's gathers its parameters; a cast input is the input)
                handles.append(module.register_forward_pre_hook(_Hook(self._pre_hook(t, axis)), with_kwargs=True))
                handles.append(
                    module.register_forward_hook(_Hook(self._forward_hook(t)), with_kwargs=True, always_call=True)
                )
            elif id(module) in holders:
                start = _Hook(self._start_hook(axis))
                handles.append(module.register_forward_pre_hook(start, with_kwargs=True, prepend=True))
                handles.append(module.register_forward_hook(_Hook(self._end_hook), always_call=True))
        return handles

    @property
    def paths(self) -> dict[str, str]:
        """{module path: how its per-example gradients are computed}: ``"rule LinearRule"``,
        ``"direct (mul, expand)"`` (its parameters given an example axis in the operations
        that use them), or ``"torch.func (…)"`` with the operation that sent it there."""
        return {t.path or "<model>": t.path_taken() for t in self.targets}

    def _start_hook(self, declared: int | None):
        """The pre-hook of a module that holds targets: :meth:`_start`."""

        def hook(module, args, kwargs):
            self._start(module, args, kwargs, declared)

        return hook

    def _start(self, module: nn.Module, args: tuple, kwargs: dict, declared: int | None) -> None:
        """Before a call of a hooked module: where none runs, a forward pass starts; its inputs
        (those not already followed from an earlier call) hold their examples along the
        declared axis, n of them as the first tensor input has there: an input with another
        number of rows there (an attention mask (t, t) of a sequence-first model) has none, and
        one row is a batch of one that broadcasts. A module with a declared axis has its inputs
        marked there, always."""
        if not self._capturing():
            return
        starting = self._entry is None
        if starting and torch._C._current_graph_task_id() == -1:  # not a recomputation inside a backward
            for t in self.targets:
                t.drop_abandoned()
        if starting and not any(t.calls for t in self.targets):  # not a second pass of one step
            axes.new_forward()
        if starting or declared is not None:
            axis = self.input_axis if declared is None else declared
            fresh = [x for x in _input_tensors(args, kwargs) if declared is not None or axis_of(x) is None]
            first = next((x for x in _input_tensors(args, kwargs) if x.dim() > axis), None)
            n = None if first is None else first.shape[axis]
            for x in fresh:  # an input without n (or 1) rows there has no example axis: a mask (t, t)
                if x.dim() > axis and x.shape[axis] in (n, 1):
                    mark(x, Axis(axis))
            state = axis_of(first)
            if isinstance(state, Axis) and (starting or self.n_forward is None):
                self.n_forward = state.examples(first)
        if starting:
            self._entry = module
            self._tracker = Tracker()
            self._tracker.__enter__()

    def _end_hook(self, module, args, output):
        """After the call that started the forward pass: stop the modes kept past their
        module's call, then the tracker.

        A module that returns a tensor computed from its parameters alone (a relative-position
        bias table, as Swin's and BEiT's) has its mode kept on until the pass ends, so that the
        operations where that tensor meets the batch, in a parent module, give it the example
        axis. One that met the batch only in operations the mode cannot follow is flagged: its
        gradient cannot be split (see :meth:`check_before_backward`).
        """
        if self._entry is not module:
            return
        while self._lingering:
            mode, target = self._lingering.pop()
            mode.__exit__(None, None, None)
            if mode.record.unhandled:
                mode.record.shared_output = f"a tensor used by {'; '.join(mode.record.unhandled)} outside it"
            target.last_path = mode.record.path()
        self._tracker.__exit__(None, None, None)
        self._tracker = self._entry = None

    def _watch(self, target: Target, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Before a call of a module with directly used parameters (or of a rule's module called
        without examples): watch its operations."""
        shared = target.rule is not DIRECT
        if shared and not _without_examples(args, kwargs):
            return  # an ordinary call of a registered rule
        record = DirectCall(without_examples=shared)
        n = self.n_forward
        if n is None:
            record.unhandled.append("no example axis known")
            target.modes.append((None, record))
            return
        params = {id(p): (local, p) for local, p in target.rule.parameters(module)}
        mode = DirectMode(params, {id(b) for b in module.buffers()}, n, record, self._accounted_by_other(target))
        mode.__enter__()
        target.modes.append((mode, record))

    def _accounted_by_other(self, target: Target) -> Callable[[Tensor], bool]:
        """For ``target``'s direct mode: whether a use of a parameter happens inside another
        target's call whose rule also covers that parameter (the innermost module running)."""
        running = self._running

        def accounted(param: Tensor) -> bool:
            inner = running[-1] if running else None
            return inner is not None and inner is not target and id(param) in inner.param_ids

        return accounted

    def _pre_hook(self, target: Target, declared: int | None):
        """Before a target's call: a forward pass may start here (:meth:`_start`); the target runs
        innermost (read by direct modes); its rule may build some gradients itself
        (:meth:`_detach`); its operations may be watched (:meth:`_watch`)."""
        detaches = type(target.rule).grads_in_backward is not Rule.grads_in_backward

        def hook(module, args, kwargs):
            self._start(module, args, kwargs, declared)
            self._running.append(target)
            if not self._capturing():
                return None
            swapped = self._detach(target, module, args) if detaches else None
            self._watch(target, module, args if swapped is None else swapped, kwargs)
            return None if swapped is None else (swapped, kwargs)

        return hook

    def _detach(self, target: Target, module: nn.Module, args: tuple) -> tuple | None:
        """Before a call whose rule builds some batch gradients itself: run the forward on
        detached copies of those parameters, so that autograd leaves them out, and, where the
        input requires a gradient, on an identity of the input through which they come back
        (else they come back through a copy of the output, see :meth:`_forward_hook`). Returns
        the call's new positional inputs, or None where they are unchanged."""
        first = args[0] if args else None
        if axis_of(first) != (0, 1, 1) or first.shape[0] != self.n_forward:
            return None  # examples elsewhere, or flattened with positions: the pieces need regrouping first
        if target.shared and not self.keep.grads:
            return None  # its factored records are combined with another module's (tied weights)
        names = [
            n for n in target.rule.grads_in_backward(module, args, self.keep) if module._parameters[n].requires_grad
        ]
        target.detached = {n: module._parameters[n] for n in names}
        for n, p in target.detached.items():
            module._parameters[n] = p.detach()
        if names and first.requires_grad:  # the gradients enter through the input: no copy of the output
            target.slot = _Slot()
            same = mark(_RuleBuildsGradsAtInput.apply(first, target.slot, *target.detached.values()), Axis(0))
            return (same, *args[1:])
        return None

    def _forward_hook(self, target: Target):
        """After a target's call: the call recorded (:meth:`_record`), then, if the forward pass
        started here, its end (:meth:`_end_hook`)."""
        record_call = self._record(target)

        def hook(module, args, kwargs, output):
            try:
                return record_call(module, args, kwargs, output)
            finally:
                self._end_hook(module, args, output)

        return hook

    def _record(self, target: Target):
        def hook(module, args, kwargs, output):
            if self._running and self._running[-1] is target:
                self._running.pop()
            internals, target.internals = target.internals, {}
            detached, target.detached = target.detached, {}
            slot, target.slot = target.slot, None
            for name, p in detached.items():  # restored even when the forward raised, unless FSDP2
                if not isinstance(module._parameters.get(name), nn.Parameter):  # put its shard back meanwhile
                    module._parameters[name] = p
            record = None
            if target.modes:
                mode, record = target.modes.pop()
                if mode is not None and self._entry is not None and _computed_from_parameters(mode, output):
                    self._lingering.append((mode, target))  # keep watching: its output meets the batch later
                elif mode is not None:
                    mode.__exit__(None, None, None)
                target.last_path = record.path()
            if not self._capturing() or output is None:
                return None
            if record is None:  # a directly-used module's mode gives its parameters the example axis itself
                args, kwargs, output = self._broadcast(target, args, kwargs, output)
            if not args and kwargs:  # inputs by keyword: rules read the first one positionally
                args, kwargs = _positional(module, kwargs)
            call = Call(tuple(_detached(a) for a in args), {k: _detached(v) for k, v in kwargs.items()})
            call.layout = Layout.of(args, kwargs, output_tensors(output), internals)
            if record is not None:
                call.pieces["direct"] = record
            if detached and slot is None:
                call.grad_outputs = [None]
                build = self._backward_call(target, call, list(detached))

                def noticed_build(grad_output: Tensor) -> list[Tensor]:
                    self._noticed(_store_grad(call, 0))(grad_output)
                    return build(grad_output)

                target.keep(call, [noticed_build])  # held by the node below
                return mark(_RuleBuildsGrads.apply(output, noticed_build, *detached.values()), axis_of(output))
            outputs = output_tensors(output)
            if slot is not None:  # its output gradient reaches the slot before the input's node runs
                slot.build = self._backward_call(target, call, list(detached))
                on_grad(outputs[0], slot.receive)
            if not any(o.requires_grad for o in outputs):
                return None if record is None else output
            call.grad_outputs = [None] * len(outputs)
            hooks = []  # that the graph holds
            for k, o in enumerate(outputs):
                if o.requires_grad:
                    hooks.append(_store_grad(call, k))
                    on_grad(o, self._noticed(hooks[-1]))
            for name, tensor in internals.items():
                call.internals[name] = tensor.detach()
                if tensor.requires_grad:
                    hooks.append(_store_internal_grad(call, name))
                    on_grad(tensor, self._noticed(hooks[-1]))
            target.keep(call, hooks)
            return output

        return hook

    def _broadcast(self, target: Target, args: tuple, kwargs: dict, output: Any) -> tuple[tuple, dict, Any]:
        """A call made for a batch of one (its inputs and outputs hold one example along axis 0,
        as position ids of shape (1, t) passed to the model) in a forward pass of n > 1, whose
        output broadcasts against the batch: its output and inputs get the example axis
        explicitly, so that its output gradient arrives per example. Any other call is
        returned unchanged."""
        n = self.n_forward
        if n is None or n == 1:
            return args, kwargs, output
        outputs = output_tensors(output)
        if not outputs or any(o.dim() > 0 and o.shape[0] != 1 for o in outputs):  # the usual case
            return args, kwargs, output
        tensors = [x for x in (*args, *kwargs.values(), *outputs) if isinstance(x, Tensor) and x.dim() > 0]
        if any(axis_of(x) != (0, 1, 1) or x.shape[0] != 1 for x in tensors):
            return args, kwargs, output

        def widen_batch(x):
            if isinstance(x, Tensor) and x.dim() > 0:
                return mark(x.expand(n, *x.shape[1:]), Axis(0))
            return x

        if isinstance(output, Tensor):
            output = widen_batch(output)
        elif isinstance(output, (tuple, list)):
            output = type(output)(widen_batch(o) for o in output)
        else:
            return args, kwargs, output
        return tuple(widen_batch(a) for a in args), {k: widen_batch(v) for k, v in kwargs.items()}, output

    def _backward_call(self, target: Target, call: Call, names: list[str]):
        """The backward of one call whose rule builds the batch gradients of ``names``."""

        def backward(grad_output: Tensor) -> list[Tensor]:
            # pieces added to another call's before squaring must be kept whole
            whole = self.keep.grads or len(target.calls) > 1
            wide = replace(call, args=tuple(widen(a) for a in call.args))
            grads = target.rule.backward_call(target.module, wide, widen(grad_output), Keep(whole, self.keep.second))
            params = target.module._parameters
            return [grads[n].to(params[n].dtype) for n in names]

        return backward

    def _noticed(self, hook: Callable[[Tensor], None]) -> Callable[[Tensor], None]:
        """A gradient hook that also notices a backward run by someone else (a framework's
        ``loss.backward()``) and asks autograd to call :attr:`on_external_backward` at its end."""

        def noticing(grad: Tensor) -> None:
            hook(grad)
            if not self.own_backward and not self._end_queued and self.on_external_backward is not None:
                self._end_queued = True
                torch.autograd.Variable._execution_engine.queue_callback(self._end_external)

        return noticing

    def _end_external(self) -> None:
        self._end_queued = False
        self.on_external_backward()

    def _capturing(self) -> bool:
        return not self._paused and torch.is_grad_enabled()

    def check_before_backward(self, n: int) -> None:
        """Raise, before any gradient is computed, if the captured forward cannot be used.

        Raises:
            CaptureError: nothing captured since the last backward, a parameter frozen when the
                capture was made that is trainable now or a trainable one put into the model
                since (:func:`_watch_registrations`), a call whose batch size is
                not n (nor n·t positions flattened examples-first, for a position-wise layer),
                or a module that returns a tensor computed from its parameters alone.
            ExampleCouplingError: a module that mixes examples (e.g. BatchNorm in training).
        """
        if self.targets and not any(t.calls for t in self.targets):
            raise CaptureError(
                "No forward pass was captured since the last backward: run the model's forward "
                "(with gradients enabled, after creating PerExample, outside pe.paused()) before each backward."
            )
        if (change := self._unhooked_change()) is not None:
            self.clear()
            raise CaptureError(
                f"{change}: its per-example gradients would be missing. Create PerExample again after "
                "changing the model or which parameters train (pe.remove(); pe = pergrad.PerExample(model, "
                "...)); the callbacks and pergrad train do not follow such a change."
            )
        for t in self.targets:
            if t.calls and (reason := t.rule.check(t.module)):
                raise ExampleCouplingError(f"{t.describe()}: {reason}.")
            for call in t.calls:
                record = call.pieces.get("direct")
                if record is not None and record.shared_output:
                    self.clear()
                    raise CaptureError(
                        f"{t.describe()} returns {record.shared_output}, computed from its parameters "
                        "alone with no example axis: pergrad cannot see each example's share there. "
                        "Register a rule for the module that uses it, or freeze its parameters."
                    )
                rule = _rule_of(t, call)
                m = rule.batch_size(t.module, call)  # (a rule refuses an unbatched input here)
                if (problem := _layout_problem(t, rule, call)) is not None:
                    self.clear()
                    raise CaptureError(problem)
                if m == n:
                    continue
                self.clear()
                raise CaptureError(
                    f"{t.describe()} saw a batch of {m} examples but losses has {n}. Pass one "
                    "loss per example (shape (n,), e.g. reduction='none'), and run forwards that "
                    "are not backpropagated (evaluation) under torch.no_grad(). If the model's "
                    "inputs hold their examples along their second axis, say so: "
                    "PerExample(model, batch_first=False)."
                )

    def reached_calls(self, target: Target, n: int) -> list[Call]:
        """The calls of a target that the last backward reached, as its rule reads them (see
        :attr:`Rule.flattens_positions`), float16/bfloat16 tensors in float32."""
        calls = [c for c in target.calls if c.reached or _direct_reached(c)]
        return [_as_read(c, _rule_of(target, c)) for c in calls]

    def examples_reached(self) -> int | None:
        """The number of examples of the backward that just ran: the forward pass's, or the
        batch size of the first call it reached; None if it reached none."""
        for t in self.targets:
            for call in t.calls:
                if call.reached or _direct_reached(call):
                    return self.n_forward if self.n_forward is not None else t.rule.batch_size(t.module, call)
        return None

    def saw_low_precision(self) -> bool:
        """Whether an output gradient of the forward in hand is float16/bfloat16 (autocast)."""
        half = (torch.float16, torch.bfloat16)
        return any(g is not None and g.dtype in half for t in self.targets for c in t.calls for g in c.grad_outputs)

    def paused(self) -> _Paused:
        """Context in which forwards are not captured (rules that recompute a forward)."""
        return _Paused(self)

    def _unhooked_change(self) -> str | None:
        """What the model gained since the capture was made that its hooks do not cover: a
        trainable parameter put into it (:func:`_watch_registrations`) or one that was frozen
        then; None if nothing."""
        if self.added is not None:
            return (
                f"'{self.added}' has trainable parameters that pergrad does not hook (put into the model "
                "after PerExample was created)"
            )
        thawed = [name for name, p in self._frozen if p.requires_grad]
        if thawed:
            more = f" (and {len(thawed) - 1} more)" if len(thawed) > 1 else ""
            return f"'{thawed[0]}'{more} was frozen when PerExample was created and is trainable now, unhooked"
        return None

    def clear(self) -> None:
        """Drop every saved tensor, and the example axes followed in the forward pass."""
        for t in self.targets:
            t.calls.clear()
            t.anchors.clear()
        axes.new_forward()

    def remove(self) -> None:
        """Remove the hooks and drop every saved tensor."""
        for h in (*self._handles, *self._registrations):
            h.remove()
        self._handles.clear()
        self._registrations.clear()
        for t in self._exposing:
            _EXPOSING.pop(id(t.module), None)
            t.module.__dict__.pop("forward", None)
        self._exposing.clear()
        self.clear()

    def parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Every covered parameter once, by its name in the model."""
        seen = set()
        for t in self.targets:
            for local, p in t.rule.parameters(t.module):
                if id(p) not in seen:
                    seen.add(id(p))
                    yield t.param_names[local], p


def _watch_registrations(capture: Capture, modules: dict[str, nn.Module], known: set[int]) -> list:
    """Process-wide hooks that set ``capture.added`` when a module or parameter with trainable
    parameters not among ``known`` (ids) is put into one of ``modules`` ({path: module}, the
    model's when the capture was made): ``model.head = nn.Linear(...)``, an adapter. The
    capture is held weakly, and the hooks go when it does (or at :meth:`Capture.remove`).
    FSDP2's swaps of its own parameters do not go through them."""
    ref = weakref.ref(capture)
    paths = {id(m): path for path, m in modules.items()}

    def note(parent: nn.Module, name: str, params) -> None:
        c = ref()
        if c is None or c.added is not None or id(parent) not in paths:
            return
        if any(p.requires_grad and id(p) not in known for p in params):
            c.added = f"{paths[id(parent)]}.{name}".lstrip(".")

    def on_module(parent, name, child):
        if child is not None:
            note(parent, name, child.parameters())

    def on_parameter(parent, name, param):
        if param is not None:
            note(parent, name, [param])

    handles = [
        nn.modules.module.register_module_module_registration_hook(on_module),
        nn.modules.module.register_module_parameter_registration_hook(on_parameter),
    ]
    for h in handles:
        weakref.finalize(capture, h.remove)
    return handles


def _targets(model: nn.Module, on_unsupported: str) -> list[Target]:
    """The modules whose trainable parameters a rule computes, outermost first; a module
    without a rule is computed by its operations ("auto") or by torch.func ("fallback").

    Raises:
        UnsupportedModuleError: a module with trainable parameters and no rule, under "error".
    """
    names = {id(p): name for name, p in model.named_parameters()}
    targets: list[Target] = []
    covered_prefixes: list[str] = []
    for path, module in model.named_modules():
        if any(path.startswith(prefix) for prefix in covered_prefixes):
            continue
        rule = rule_for(module)
        own = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if rule is None and own:
            if on_unsupported == "error":
                raise UnsupportedModuleError(
                    f"{type(module).__name__} at '{path or '<model>'}' has trainable "
                    f"parameters {own} and no per-example rule. Register one with "
                    f"pergrad.register_rule({type(module).__name__}, rule), leave "
                    "on_unsupported at 'auto' to compute it from its operations, or freeze "
                    "those parameters (requires_grad_(False))."
                )
            rule = DIRECT if on_unsupported == "auto" else FALLBACK
        if rule is None:
            continue
        if rule.covers_submodules:
            covered_prefixes.append(f"{path}." if path else "")
        params = {local: names[id(p)] for local, p in rule.parameters(module)}
        if params:
            ids = frozenset(id(p) for _, p in rule.parameters(module))
            targets.append(Target(path, module, rule, params, [], param_ids=ids))
    counts: dict[str, int] = {}
    for t in targets:
        for name in t.param_names.values():
            counts[name] = counts.get(name, 0) + 1
    for t in targets:  # a parameter several modules use: its records meet others'
        t.shared = any(counts[name] > 1 for name in t.param_names.values())
    return targets


def rule_of_calls(target: Target, calls: list[Call]) -> Rule:
    """The rule that computes a target's calls of one forward (see :func:`_rule_of`).

    Raises:
        CaptureError: a module called both with and without an example axis in one forward.
    """
    if len(calls) == 1:
        return _rule_of(target, calls[0])
    rules = {id(_rule_of(target, c)): _rule_of(target, c) for c in calls}
    if len(rules) > 1:
        raise CaptureError(
            f"{target.describe()} was called both with examples and without an example axis in one "
            "forward pass: pergrad cannot add the two kinds of pieces. Register a rule for the "
            "module that calls it."
        )
    return next(iter(rules.values()))


def _positional(module: nn.Module, kwargs: dict) -> tuple[tuple, dict]:
    """A call's keyword arguments, those its class's ``forward`` also takes by position moved
    to the front, in order (``norm(input=x)`` as ``norm(x)``)."""
    bound = _forward_signature(type(module)).bind_partial(module, **kwargs)
    return bound.args[1:], bound.kwargs


@functools.cache
def _forward_signature(cls: type) -> inspect.Signature:
    return inspect.signature(cls.forward)


def _input_tensors(args: tuple, kwargs: dict) -> Iterator[Tensor]:
    """A call's tensor inputs, also those inside lists, tuples and dicts (one level)."""
    for x in (*args, *kwargs.values()):
        if isinstance(x, Tensor):
            yield x
        elif isinstance(x, (list, tuple)):
            yield from (y for y in x if isinstance(y, Tensor))
        elif isinstance(x, dict):
            yield from (y for y in x.values() if isinstance(y, Tensor))


def _ancestors(path: str) -> list[str]:
    """'a.b.c' -> ['', 'a', 'a.b', 'a.b.c']."""
    parts = path.split(".") if path else []
    return [".".join(parts[:k]) for k in range(len(parts) + 1)]


def _without_examples(args: tuple, kwargs: dict) -> bool:
    """Whether a call's first tensor input has no example axis in the forward pass in progress
    (T5's relative-position buckets (t, t), position ids made inside the model)."""
    first = next(_input_tensors(args, kwargs), None)
    return first is not None and axis_of(first) is None


def _layout_problem(target: Target, rule: Rule, call: Call) -> str | None:
    """Why a call cannot be computed in the layout it was given, or None."""
    record = call.pieces.get("direct")
    if record is not None and not record.unhandled:
        return None  # the direct mode gave its parameters the example axis where they met the batch
    x, state = call.primary()
    declare = (
        f"Say where its input holds the examples: PerExample(model, example_axes={{'{target.path}': axis}}), "
        "or register a rule for the module."
    )
    expected = rule.example_axis(target.module)
    reads_layout = expected is not None or rule.flattens_positions or isinstance(rule, (FunctionalRule, DirectRule))
    if isinstance(state, Lost) and reads_layout:  # (an EmbeddingBag finds its bags by their offsets)
        return f"{target.describe()}: where its input holds the examples was lost at {state.describe()}. {declare}"
    if rule.flattens_positions or expected is None or not isinstance(state, Axis) or state == (expected, 1, 1):
        return None
    where = f"along axis {state.dim}" + (" flattened with other rows" if state[1:] != (1, 1) else "")
    return (
        f"{target.describe()} computes with its examples along axis {expected} of its input, but the input "
        f"holds them {where}: it would mix examples. Check the model's layout (PerExample(model, "
        f"batch_first=False) for sequence-first inputs). {declare}"
    )


def _rule_of(target: Target, call: Call) -> Rule:
    """The rule that computes a call: the direct path for a call its rule saw without examples."""
    record = call.pieces.get("direct")
    return DIRECT if record is not None and record.without_examples else target.rule


def _may_be_reached(call: Call, hooks: tuple[weakref.ref, ...]) -> bool:
    """Whether ``call`` was reached by a backward, or its graph is still alive (one of its
    gradient hooks, or of its direct path's, is)."""
    if call.reached or _direct_reached(call) or any(ref() is not None for ref in hooks):
        return True
    record = call.pieces.get("direct")
    return record is not None and record.graph_alive()


def _direct_reached(call: Call) -> bool:
    record = call.pieces.get("direct")
    return record is not None and not record.unhandled and record.reached


def _as_read(call: Call, rule: Rule) -> Call:
    """The call as its rule reads it: float16/bfloat16 tensors in float32 and, for a
    position-wise rule, every tensor with its examples moved to axis 0 ((n, …))."""
    layout = call.layout
    half = (torch.float16, torch.bfloat16)
    moves = rule.flattens_positions and layout is not None and not layout.examples_first_already()
    tensors = (*call.args, *call.grad_outputs)
    if not moves and not any(isinstance(x, Tensor) and x.dtype in half for x in tensors):
        return call  # the usual case: as captured

    def fix(x, state):
        if not isinstance(x, Tensor):
            return x
        return widen(axes.examples_first(x, state) if moves and isinstance(state, Axis) else x)

    internals = layout.internals if layout is not None else {}
    return replace(
        call,
        args=tuple(fix(a, s) for a, s in zip(call.args, layout.args, strict=True))
        if layout
        else tuple(map(widen, call.args)),
        kwargs={k: fix(v, layout.kwargs[k] if layout else None) for k, v in call.kwargs.items()},
        grad_outputs=[fix(g, layout.outputs[k] if layout else None) for k, g in enumerate(call.grad_outputs)],
        internals={k: fix(v, internals.get(k)) for k, v in call.internals.items()},
        internal_grads={k: fix(v, internals.get(k)) for k, v in call.internal_grads.items()},
        layout=None if moves else layout,
    )


def _computed_from_parameters(mode: DirectMode, output: Any) -> bool:
    """Whether a directly-used module's output is (or holds) a tensor computed from its
    parameters alone, with no example axis yet."""
    return any(mode._tracked(o) is not None for o in output_tensors(output))


# id(module) -> (capture, target) for the modules whose rule exposes internals of the forward
_EXPOSING: dict[int, tuple[Capture, Target]] = {}


class _ExposingForward:
    """Installed as ``module.forward`` on a hooked module whose rule has an exposing forward:
    the rule's exposing form while capturing, else the class's forward.

    A deep copy of the model gets one bound to the copy, which is not in ``_EXPOSING`` and so
    runs the class's forward; a pickled model (``torch.save`` of the whole model) gets the
    class's forward itself.
    """

    __slots__ = ("module",)

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, *args, **kwargs):
        module = self.module
        found = _EXPOSING.get(id(module))
        if found is None or found[1].module is not module or not found[0]._capturing():
            return type(module).forward(module, *args, **kwargs)
        target = found[1]
        output, target.internals = target.rule.exposing_forward(module, args, kwargs)
        return output

    def __deepcopy__(self, memo) -> _ExposingForward:
        return _ExposingForward(copy.deepcopy(self.module, memo))

    def __reduce__(self):
        return getattr, (self.module, "forward")  # the class's, while unpickling the module's state


def _store_internal_grad(call: Call, name: str):
    def hook(grad: Tensor) -> None:
        previous = call.internal_grads.get(name)
        call.internal_grads[name] = grad if previous is None else previous + grad

    return hook


class _Slot:
    """Where a call's forward hook leaves the function that builds its parameters' gradients
    from its output gradient (``build(grad_output) -> [grads]``), and the backward pass in
    progress leaves that output gradient, for :class:`_RuleBuildsGradsAtInput`."""

    build: Callable[[Tensor], list[Tensor]] | None = None
    grad_output: Tensor | None = None

    def receive(self, grad_output: Tensor) -> None:
        self.grad_output = grad_output


class _RuleBuildsGradsAtInput(torch.autograd.Function):
    """Identity on a module's input (a view, never copied) whose backward also returns the
    gradients of the parameters its forward ran detached, as the module's rule builds them.

    Autograd reaches this node after the module's own backward, whose output gradient the
    capture's hooks have stored by then: the rule reads it there.
    """

    @staticmethod
    def forward(ctx, x, slot, *params):
        ctx.slot = slot
        return x

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_input):
        slot = ctx.slot
        grad_output, slot.grad_output = slot.grad_output, None
        return (grad_input, None, *slot.build(grad_output))


class _RuleBuildsGrads(torch.autograd.Function):
    """Identity on a module's output whose backward also returns the gradients of the
    parameters its forward ran detached, as the module's rule builds them."""

    @staticmethod
    def forward(ctx, output, build, *params):
        ctx.build = build
        return output.clone()  # not a view: the caller may modify it in place (out += residual)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        return (grad_output, None, *ctx.build(grad_output))


def _store_grad(call: Call, k: int):
    def hook(grad: Tensor) -> None:
        previous = call.grad_outputs[k]
        call.grad_outputs[k] = grad if previous is None else previous + grad

    return hook


class _Paused:
    """Nestable: leaving restores the state found on entering (a rule's recomputation inside
    the user's :meth:`pergrad.PerExample.paused` leaves the capture paused)."""

    def __init__(self, capture: Capture):
        self._capture = capture
        self._was = False

    def __enter__(self):
        self._was, self._capture._paused = self._capture._paused, True

    def __exit__(self, *exc):
        self._capture._paused = self._was
