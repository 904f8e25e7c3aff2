"""Hooks that capture, per module and per call, the input activations and output gradients.

The :class:`Capture` owns every hook and every saved tensor, and clears them: nothing is
stored on the modules. A forward hook on each *target* module (one whose trainable
parameters a rule computes) saves the call's inputs and registers tensor hooks on its
outputs; those receive the gradient of the reduced loss during the backward pass.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .errors import CaptureError, ExampleCouplingError, UnsupportedModuleError
from .rules import FALLBACK, Call, Keep, Rule, rule_for
from .rules.functional import output_tensors

__all__ = ["Capture", "Target"]


@dataclass
class Target:
    """A module whose trainable parameters a rule computes.

    Attributes:
        path: the module's name in ``model.named_modules()`` ("" for the model itself).
        module: the module.
        rule: its rule.
        param_names: local parameter name -> name in ``model.named_parameters()``.
        calls: the calls captured since the last backward.
        internals: what the rule's exposing forward returned for the call in progress.
        shared: whether one of its parameters is also used by another module (tied weights).
        detached: parameters swapped for detached copies during the call in progress.
    """

    path: str
    module: nn.Module
    rule: Rule
    param_names: dict[str, str]
    calls: list[Call]
    internals: dict[str, Tensor] = field(default_factory=dict)
    shared: bool = False
    detached: dict[str, nn.Parameter] = field(default_factory=dict)

    def describe(self) -> str:
        return f"{type(self.module).__name__} at '{self.path or '<model>'}'"


def _detached(x: Any) -> Any:
    return x.detach() if isinstance(x, Tensor) else x


class Capture:
    """Finds the target modules of a model, hooks them, and holds what the hooks saw.

    Args:
        model: the model.
        on_unsupported: "error" raises for a trainable module without a rule; "fallback"
            computes such a module alone with torch.func.

    Raises:
        UnsupportedModuleError: a module with trainable parameters and no rule, under "error".
    """

    def __init__(self, model: nn.Module, on_unsupported: str = "error"):
        if on_unsupported not in ("error", "fallback"):
            raise ValueError(f"on_unsupported must be 'error' or 'fallback', got {on_unsupported!r}.")
        names = {id(p): name for name, p in model.named_parameters()}
        self.targets: list[Target] = []
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
                        f"pergrad.register_rule({type(module).__name__}, rule), pass "
                        "on_unsupported='fallback' to compute it with torch.func, or freeze "
                        "those parameters (requires_grad_(False))."
                    )
                rule = FALLBACK
            if rule is None:
                continue
            if rule.covers_submodules:
                covered_prefixes.append(f"{path}." if path else "")
            params = {local: names[id(p)] for local, p in rule.parameters(module)}
            if params:
                self.targets.append(Target(path, module, rule, params, []))
        self.keep = Keep(grads=False, second=False)
        self._paused = False
        self._handles = []
        for t in self.targets:
            if type(t.rule).grads_in_backward is not Rule.grads_in_backward:
                self._handles.append(t.module.register_forward_pre_hook(self._detach_hook(t)))
            self._handles.append(
                t.module.register_forward_hook(self._forward_hook(t), with_kwargs=True, always_call=True)
            )
        self._exposing = [t for t in self.targets if type(t.rule).exposing_forward is not Rule.exposing_forward]
        for t in self._exposing:
            _EXPOSING[id(t.module)] = (self, t)
            t.module.forward = types.MethodType(_exposing_forward, t.module)

    def _detach_hook(self, target: Target):
        """Before a call whose rule builds some batch gradients itself: run the forward on
        detached copies of those parameters, so that autograd leaves them out."""

        def hook(module, args):
            if not self._capturing():
                return
            names = [n for n in target.rule.grads_in_backward(module, args) if module._parameters[n].requires_grad]
            target.detached = {n: module._parameters[n] for n in names}
            for n, p in target.detached.items():
                module._parameters[n] = p.detach()

        return hook

    def _forward_hook(self, target: Target):
        def hook(module, args, kwargs, output):
            internals, target.internals = target.internals, {}
            detached, target.detached = target.detached, {}
            module._parameters.update(detached)  # restored even when the forward raised
            if not self._capturing() or output is None:
                return None
            call = Call(tuple(_detached(a) for a in args), {k: _detached(v) for k, v in kwargs.items()})
            if detached:
                call.grad_outputs = [None]
                target.calls.append(call)
                build = self._backward_call(target, call, list(detached))
                return _RuleBuildsGrads.apply(output, build, *detached.values())
            outputs = output_tensors(output)
            if not any(o.requires_grad for o in outputs):
                return None
            call.grad_outputs = [None] * len(outputs)
            for k, o in enumerate(outputs):
                if o.requires_grad:
                    o.register_hook(_store_grad(call, k))
            for name, tensor in internals.items():
                call.internals[name] = tensor.detach()
                if tensor.requires_grad:
                    tensor.register_hook(_store_internal_grad(call, name))
            target.calls.append(call)
            return None

        return hook

    def _backward_call(self, target: Target, call: Call, names: list[str]):
        """The backward of one call whose rule builds the batch gradients of ``names``."""

        def backward(grad_output: Tensor) -> list[Tensor]:
            _store_grad(call, 0)(grad_output)
            # pieces summed over several calls or modules before squaring must be kept whole
            whole = self.keep.grads or target.shared or len(target.calls) > 1
            grads = target.rule.backward_call(target.module, call, grad_output, Keep(whole, self.keep.second))
            return [grads[n] for n in names]

        return backward

    def _capturing(self) -> bool:
        return not self._paused and torch.is_grad_enabled()

    def check_before_backward(self, n: int) -> None:
        """Raise, before any gradient is computed, if the captured forward cannot be used.

        Raises:
            CaptureError: nothing captured since the last backward, or a call whose batch
                size is not n.
            ExampleCouplingError: a module that mixes examples (e.g. BatchNorm in training).
        """
        if self.targets and not any(t.calls for t in self.targets):
            raise CaptureError(
                "No forward pass was captured since the last backward: run the model's forward "
                "(with gradients enabled, after creating PerExample) before each backward."
            )
        for t in self.targets:
            if t.calls and (reason := t.rule.check(t.module)):
                raise ExampleCouplingError(f"{t.describe()}: {reason}.")
            for call in t.calls:
                m = t.rule.batch_size(t.module, call)
                if m != n:
                    self.clear()
                    raise CaptureError(
                        f"{t.describe()} saw a batch of {m} examples but losses has {n}. Pass one "
                        "loss per example (shape (n,), e.g. reduction='none'), keep the example "
                        "axis first, and run forwards that are not backpropagated (evaluation) "
                        "under torch.no_grad()."
                    )

    def reached_calls(self, target: Target) -> list[Call]:
        """The calls of a target that the last backward reached."""
        return [c for c in target.calls if c.reached]

    def paused(self) -> "_Paused":
        """Context in which forwards are not captured (rules that recompute a forward)."""
        return _Paused(self)

    def clear(self) -> None:
        """Drop every saved tensor."""
        for t in self.targets:
            t.calls.clear()

    def remove(self) -> None:
        """Remove the hooks and drop every saved tensor."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
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


# id(module) -> (capture, target) for the modules whose rule exposes internals of the forward
_EXPOSING: dict[int, tuple[Capture, Target]] = {}


def _exposing_forward(module: nn.Module, *args, **kwargs):
    """A hooked module's forward: its rule's exposing form while capturing, else its own.

    Installed as a bound method on the instance, so that a deep copy of the model (whose
    copy is not in ``_EXPOSING``) and pickling fall back to the class's forward.
    """
    found = _EXPOSING.get(id(module))
    if found is None or found[1].module is not module or not found[0]._capturing():
        return type(module).forward(module, *args, **kwargs)
    target = found[1]
    output, target.internals = target.rule.exposing_forward(module, args, kwargs)
    return output


def _store_internal_grad(call: Call, name: str):
    def hook(grad: Tensor) -> None:
        previous = call.internal_grads.get(name)
        call.internal_grads[name] = grad if previous is None else previous + grad

    return hook


class _RuleBuildsGrads(torch.autograd.Function):
    """Identity on a module's output whose backward also returns the gradients of the
    parameters its forward ran detached, as the module's rule builds them."""

    @staticmethod
    def forward(ctx, output, build, *params):
        ctx.build = build
        return output.view_as(output)

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
    def __init__(self, capture: Capture):
        self._capture = capture

    def __enter__(self):
        self._capture._paused = True

    def __exit__(self, *exc):
        self._capture._paused = False
