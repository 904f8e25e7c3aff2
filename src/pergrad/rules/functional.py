"""Per-example gradients of any module by torch.func, for that module alone.

For each example j, the module is run on a batch of one (example j's slice of every batched
input) and differentiated with ``torch.func.vjp`` with respect to the module's parameters,
with example j's slice of the captured output gradients as cotangent; ``vmap`` does all
examples at once. This is exact for any module that treats examples independently, and costs
about one more forward and backward of the module, batched. It is the rule of
``on_unsupported="fallback"`` and of layers whose internals are not exposed to hooks
(MultiheadAttention).

Random draws inside the module (dropout) would differ from the original forward, so they
raise an error instead of giving a wrong number.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

from ..axes import Axis, Lost
from ..errors import CaptureError
from ._registry import Call, Layout, Rule
from .records import Dense, Record


@dataclass(frozen=True)
class Batched:
    """Where the example axis of one tensor input or output is.

    Attributes:
        dim: the example axis.
        keep: whether a batch of one still has that axis (re-inserted as size 1). False for
            tensors whose batch-of-one layout has no example axis (see MultiheadAttention's
            3-D masks, stored per example and head).
        rows: where examples were flattened with other rows (``outer · n · inner`` along an
            axis, see :mod:`pergrad.axes`): the tensor is given unflattened, (…, outer, n,
            inner, …) with ``dim`` the n axis, and each example's (outer, inner) rows are
            merged again into one axis for the module.
    """

    dim: int = 0
    keep: bool = True
    rows: bool = False

    def restore(self, x):
        """One example's slice as the module sees it in a batch of one."""
        if self.rows:
            return x.flatten(self.dim - 1, self.dim)
        return x.unsqueeze(self.dim) if self.keep else x


def as_batched(x: Any, state) -> tuple[Any, Batched | None]:
    """A tensor as vmap takes it, and where its examples are, from its state in the forward
    pass (:mod:`pergrad.axes`); None for a tensor without an example axis."""
    if not isinstance(x, Tensor) or state is None:
        return x, None
    if isinstance(state, Lost):
        raise CaptureError(f"where a tensor holds its examples was lost at {state.describe()}")
    if state[1:] == (1, 1):
        return x, Batched(state.dim)
    flat = x.unflatten(state.dim, (state.outer, state.examples(x), state.inner))
    return flat, Batched(state.dim + 1, rows=True)


def output_tensors(output: Any) -> list[Tensor]:
    """The tensors among a module's outputs, in order: a tensor, or tuples/lists of them,
    nested ones flattened depth-first (LSTM's ``(out, (h_n, c_n))`` gives ``[out, h_n, c_n]``)."""
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for o in output for t in output_tensors(o)]
    return []


def _axis(b: Batched | None) -> int | None:
    return None if b is None else b.dim


class FunctionalRule(Rule):
    """torch.func rule. Subclasses describe where the example axes are."""

    def example_axis(self, module):
        return None  # wherever the forward pass put them

    def input_layout(self, module: nn.Module, call: Call, n: int):
        """Inputs rearranged for vmap and where their example axes are.

        Returns:
            (args, kwargs, args_batched, kwargs_batched): the ``*_batched`` entries are a
            :class:`Batched` or None (shared by all examples). By default, each tensor where the
            forward pass put its examples (:attr:`Call.layout`); tensors without are shared.
        """
        layout = call.layout or Layout.examples_first(call)
        args = [as_batched(a, s) for a, s in zip(call.args, layout.args, strict=True)]
        kwargs = {k: as_batched(v, layout.kwargs[k]) for k, v in call.kwargs.items()}
        return (
            tuple(a for a, _ in args),
            {k: v for k, (v, _) in kwargs.items()},
            tuple(b for _, b in args),
            {k: b for k, (_, b) in kwargs.items()},
        )

    def output_layout(self, module: nn.Module, call: Call, index: int) -> Batched:
        """Where the example axis of the module's ``index``-th tensor output is."""
        layout = call.layout or Layout.examples_first(call)
        state = layout.outputs[index]
        if not isinstance(state, Axis):
            raise CaptureError(
                f"{type(module).__name__}'s output {index} holds no examples that pergrad could follow "
                f"({'lost at ' + state.describe() if isinstance(state, Lost) else 'no example axis'})"
            )
        return Batched(state.dim, rows=state[1:] != (1, 1))

    def records(self, module, calls):
        """Per call, the pieces themselves (:class:`Dense`), computed by torch.func."""
        out: dict[str, list[Record]] = {}
        for call in calls:
            for k, v in self._one_call(module, call).items():
                out.setdefault(k, []).append(Dense(v))
        return out

    def _one_call(self, module: nn.Module, call: Call) -> dict[str, Tensor]:
        n = self.batch_size(module, call)
        params = {k: _gathered(p).detach() for k, p in self.parameters(module)}
        args, kwargs, args_b, kwargs_b = self.input_layout(module, call, n)
        reached = [k for k, g in enumerate(call.grad_outputs) if g is not None]
        out_b = [self.output_layout(module, call, k) for k in reached]
        layout = call.layout or Layout.examples_first(call)
        cotangents = tuple(
            as_batched(call.grad_outputs[k], layout.outputs[k])[0] if b.rows else call.grad_outputs[k]
            for k, b in zip(reached, out_b, strict=True)
        )
        for k, c, b in zip(reached, cotangents, out_b, strict=True):
            if c.dim() <= b.dim or c.shape[b.dim] != n:
                raise CaptureError(
                    f"{type(module).__name__}'s output {k} has shape {tuple(c.shape)}, with no axis of the "
                    f"batch's {n} examples at {b.dim}, where its layout puts them: say where its inputs hold "
                    "the examples (PerExample(model, example_axes=...)), or register a rule for it "
                    "(pergrad.register_rule)."
                )

        def restore(x, b):
            return x if b is None else b.restore(x)

        def one_example(args_j, kwargs_j, cotangents_j):
            args_1 = tuple(restore(a, b) for a, b in zip(args_j, args_b, strict=True))
            kwargs_1 = {k: restore(v, kwargs_b[k]) for k, v in kwargs_j.items()}

            def forward(p):
                outputs = output_tensors(functional_call(module, p, args_1, kwargs_1))
                return tuple(outputs[k] for k in reached)

            _, pullback = vjp(forward, params)
            return pullback(tuple(restore(c, b) for c, b in zip(cotangents_j, out_b, strict=True)))[0]

        in_dims = (
            tuple(_axis(b) for b in args_b),
            {k: _axis(b) for k, b in kwargs_b.items()},
            tuple(_axis(b) for b in out_b),
        )
        try:
            with warnings.catch_warnings():
                # some ops (attention kernels) have no batching rule and loop over examples
                warnings.filterwarnings("ignore", message="There is a performance drop")
                return vmap(one_example, in_dims=in_dims, randomness="error")(args, kwargs, cotangents)
        except RuntimeError as err:
            if "randomness" not in str(err):  # an op vmap cannot batch (an RNN's in-place kernels): a loop
                try:
                    return _one_at_a_time(one_example, in_dims, (args, kwargs, cotangents), n)
                except Exception as inner:
                    raise CaptureError(
                        f"torch.func cannot compute {type(module).__name__} one example at a time ({inner}). "
                        "Register a rule for it (pergrad.register_rule), or freeze its parameters."
                    ) from inner
            raise RuntimeError(
                f"{type(module).__name__} draws random numbers in its forward (dropout?), so its "
                "per-example gradients cannot be recomputed exactly. Set its dropout to 0 or "
                "call .eval() on it."
            ) from err


def _gathered(p: Tensor) -> Tensor:
    """The whole parameter: a DTensor of a fully_shard model, whose shards FSDP2 holds again after the
    backward, all-gathered (collective; the torch.func path alone needs it); any other tensor itself."""
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def _one_at_a_time(fn, in_dims, inputs, n: int) -> dict[str, Tensor]:
    """What ``vmap(fn, in_dims)(*inputs)`` returns, one example at a time: each example's slice
    of the batched inputs (``None`` dims shared), results stacked along a new first axis."""

    def slice_of(x, dim, j):
        if isinstance(x, dict):
            return {k: slice_of(v, dim[k] if isinstance(dim, dict) else dim, j) for k, v in x.items()}
        if isinstance(x, tuple):
            return tuple(slice_of(v, dim[k] if isinstance(dim, tuple) else dim, j) for k, v in enumerate(x))
        return x if dim is None or not isinstance(x, Tensor) else x.select(dim, j)

    each = [fn(*slice_of(inputs, in_dims, j)) for j in range(n)]
    return {k: torch.stack([e[k] for e in each]) for k in each[0]}


class FallbackRule(FunctionalRule):
    """The rule used for modules without one when ``on_unsupported="fallback"``."""


FALLBACK = FallbackRule()
