"""The check of per-example results against autograd on single examples, and when it runs.

- :func:`tolerance` and :func:`worst_mismatch`: the one comparison of per-parameter squared norms
  ‖∇ℓⱼ‖² with autograd's, used by :meth:`PerExample.backward` (through the retained graph) and
  by the framework callbacks (:class:`StepCheck`, through a recomputed single-example loss).
- :func:`checks_of`: what has been checked of a model, kept once per model and settings (not
  per :class:`~pergrad.PerExample`): attaching again to a model already verified with the same
  modules, parameters and settings does not check again; a model whose modules changed does.
- :class:`StepCheck`: the check of one optimizer step whose backward passes a framework ran.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

if TYPE_CHECKING:
    from .per_example import PerExample, PerExampleResult

__all__ = [
    "ModelChecks",
    "Schedule",
    "StepCheck",
    "checks_of",
    "example_of",
    "examples_in",
    "fingerprint",
    "single_example_sq_norms",
    "tolerance",
    "worst_mismatch",
]


def tolerance(dtype: torch.dtype, low_precision: bool) -> float:
    """Relative tolerance of the single-example check: 1e-5 in float64 (models that round inside
    to float32 on purpose, as Llama's softmax, differ by about 1e-7), 1e-3 in float32, 5e-2
    where the forward ran in float16/bfloat16."""
    return 5e-2 if low_precision else 1e-5 if dtype == torch.float64 else 1e-3


def worst_mismatch(
    got: dict[str, float], want: dict[str, float], rtol: float, *, up_to_factor: bool = False
) -> tuple[str, float, float] | None:
    """A parameter whose ‖∇ℓⱼ‖² disagrees with autograd's, as (name, got, want), or None where all
    agree: the first in parameter order, or, with ``up_to_factor``, the one that disagrees most.

    A value agrees when ``|got − want| ≤ rtol·(max(got, want) + 10⁻³·Σ want)``: relative to the
    larger of the two, with a floor of 10⁻³ of the example's total squared norm (a gradient that
    vanishes up to rounding, as a key bias's under softmax). With a fitted factor every
    parameter moves a little when one is wrong, so the one with the largest
    ``|got − want| / (max(got, want) + 10⁻³·Σ want)`` is named: the wrong one moves most.

    Args:
        got: {parameter name: pergrad's ‖∇ℓⱼ‖²} of one example j.
        want: {parameter name: autograd's} of the same example.
        rtol: see :func:`tolerance`.
        up_to_factor: compare up to one positive factor c = Σ got / Σ want, fitted from the totals
            (``want`` is then c·want): for a reference loss whose scale relative to the batch's
            per-example loss pergrad cannot know (a loss averaged over an example's own tokens
            against a batch's token-summed loss over all its tokens). A factor that is not
            positive and finite is a mismatch of the first parameter.
    """
    if up_to_factor:
        total_got, total_want = sum(got.values()), sum(want.values())
        c = total_got / total_want if total_want > 0 else (1.0 if total_got == 0 else float("inf"))
        if not (0 < c < float("inf")) and total_got + total_want > 0:
            name = next(iter(want))
            return name, got[name], want[name]
        want = {name: c * w for name, w in want.items()}
    total = sum(want.values())
    worst, worst_error = None, rtol
    for name, w in want.items():
        g = got[name]
        size = max(g, w) + 1e-3 * total
        error = abs(g - w) / size if size > 0 else 0.0
        if error > worst_error:
            worst, worst_error = (name, g, w), error
            if not up_to_factor:
                break
    return worst


def single_example_sq_norms(
    params: dict[str, nn.Parameter], loss: Tensor, *, retain_graph: bool = False
) -> dict[str, float]:
    """{name: ‖∇ loss‖²} per parameter by autograd, through ``loss.backward`` (so that reentrant
    activation checkpointing works), ``.grad`` stashed before and restored after."""
    stash = {name: p.grad for name, p in params.items()}
    try:
        for p in params.values():
            p.grad = None
        loss.backward(retain_graph=retain_graph)
        return {name: 0.0 if p.grad is None else float(p.grad.double().square().sum()) for name, p in params.items()}
    finally:
        for name, p in params.items():
            p.grad = stash[name]


@dataclass
class ModelChecks:
    """What has been checked of one model with one fingerprint (see :func:`checks_of`).

    Attributes:
        verified: the single-example check passed.
        backwards: backward passes measured by :meth:`PerExample.backward` (the sums check runs
            on every :data:`~pergrad.per_example.CHECK_SUMS_EVERY`-th of them).
    """

    verified: bool = False
    backwards: int = 0


# model -> {fingerprint: ModelChecks}. Keyed by the model object, weakly: an entry goes with its model,
# and holds no reference to the model or its modules (the fingerprint keeps their ids and classes
# only, and an id cannot be reused while the model that holds the module is alive).
_CHECKED: WeakIdKeyDictionary = WeakIdKeyDictionary()
_KEPT_PER_MODEL = 8  # fingerprints kept per model (the oldest dropped first)


def fingerprint(model: nn.Module, rules: tuple, settings: tuple) -> tuple:
    """What the check's verdict depends on: every module (path, object, class), every parameter
    (name, object, shape, dtype, device, requires_grad), the rule objects in use and the
    settings (``on_unsupported``, ``grads``, ``second_moment``). Its cost is one walk over the
    modules and parameters."""
    modules = tuple((path, id(m), type(m)) for path, m in model.named_modules())
    params = tuple(
        (name, id(p), tuple(p.shape), p.dtype, p.device, p.requires_grad) for name, p in model.named_parameters()
    )
    return modules, params, tuple(id(r) for r in rules), settings


def checks_of(model: nn.Module, key: tuple) -> ModelChecks:
    """The :class:`ModelChecks` of ``model`` with fingerprint ``key`` (a new one the first time)."""
    kept = _CHECKED.get(model)
    if kept is None:
        kept = _CHECKED[model] = {}
    found = kept.get(key)
    if found is None:
        if len(kept) >= _KEPT_PER_MODEL:
            del kept[next(iter(kept))]
        found = kept[key] = ModelChecks()
    return found


def example_of(batch: Any, j: int, n: int) -> Any:
    """Example j of a batch whose tensors hold n examples along their first axis, as a batch of
    one: every tensor sliced ``[j:j+1]``, through dicts, lists, tuples and named tuples; anything
    else (numbers, strings, None) kept as it is.

    Raises:
        ValueError: a tensor of the batch does not have n rows.
    """
    if isinstance(batch, Tensor):
        if batch.dim() == 0 or batch.shape[0] != n:
            raise ValueError(
                f"the step's batch holds a tensor of shape {tuple(batch.shape)}, not {n} examples along its "
                "first axis: the check against single examples cannot take one example of it. Keep every "
                "tensor of the batch examples-first, or pass verify=False to the callback."
            )
        return batch[j : j + 1]
    if isinstance(batch, Mapping):
        items = {k: example_of(v, j, n) for k, v in batch.items()}
        try:
            return cast(Any, type(batch))(items)
        except TypeError:
            return items
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(example_of(v, j, n) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(example_of(v, j, n) for v in batch)
    return batch


def examples_in(batch: Any) -> int:
    """The number of examples of a batch: the first axis of its first tensor (see :func:`example_of`).

    Raises:
        ValueError: the batch holds no tensor with an axis.
    """
    if isinstance(batch, Tensor) and batch.dim() > 0:
        return batch.shape[0]
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for v in values:
        try:
            return examples_in(v)
        except ValueError:
            continue
    raise ValueError(
        f"the step's batch ({type(batch).__name__}) holds no tensor with an example axis: the check against "
        "single examples cannot take one example of it. Pass verify=False to the callback."
    )


class Schedule:
    """Which optimizer steps a callback checks, and which of their examples.

    Args:
        verify: "first" (the first measured step, examples 0 and n−1), True (every step, the
            same two), an int k ≥ 1 (the first step as "first", then one example on every k-th
            step, a different one each time), or False (none).
    """

    def __init__(self, verify: bool | str | int):
        periodic = isinstance(verify, int) and not isinstance(verify, bool) and verify >= 1
        ok = verify is True or verify is False or verify == "first" or periodic
        if not ok:
            raise ValueError(f"verify must be 'first', True, False or a number of steps k >= 1, got {verify!r}.")
        self.verify = verify

    def due(self, step: int) -> bool:
        """Whether optimizer step ``step`` (0 for the first) is checked."""
        v = self.verify
        if v is False:
            return False
        if v is True or step == 0:
            return True
        return not isinstance(v, str) and step % v == 0

    def examples(self, step: int, n: int) -> list[int]:
        """The examples of a checked step of n examples."""
        if step == 0 or not isinstance(self.verify, int) or self.verify is True:
            return sorted({0, n - 1})
        return [(step // self.verify) % n]


class StepCheck:
    """The single-example check of one optimizer step whose backward passes a framework ran.

    Created before the step's first forward: it asks ``pe`` to keep each backward's gradients
    for the sums check (:meth:`PerExample.watch_sums`) and notes every module's mode. The
    caller turns dropout off before each of the step's forwards (:meth:`dropout_off`), adds
    each micro-batch (:meth:`add`), and hands the step's result to :meth:`finish`, which
    recomputes the loss of single examples and restores the modes.

    Why dropout off: example j's reference gradient comes from a forward of example j alone,
    whose dropout masks cannot be those that row j got in the batch's forward (the masks are
    drawn for the whole batch at once, so forking the random state does not reproduce them);
    with dropout off on both sides the two are the same computation. So the checked step
    trains without dropout, and so does each periodic check's step (one in k). Modules that
    say ``gradient_checkpointing`` (Hugging Face's layers and models, which checkpoint only in
    training mode) keep their mode, so that checkpointing stays on.

    Args:
        pe: the callback's :class:`~pergrad.PerExample`.
        model: the model whose modules' modes are switched.
        examples: which of the step's n examples to check (see :class:`Schedule`).
    """

    def __init__(self, pe: PerExample, model: nn.Module, examples: Callable[[int], list[int]]):
        self.pe = pe
        self.examples = examples
        self.batches: list[Any] = []
        self._modes = [(m, m.training) for m in model.modules()]
        pe.watch_sums()

    def dropout_off(self) -> None:
        """Every module in eval mode but those that say ``gradient_checkpointing`` (idempotent:
        call it before each forward of the step, after the framework's ``model.train()``)."""
        for m, _ in self._modes:
            if not getattr(m, "gradient_checkpointing", False):
                m.training = False

    def add(self, batch: Any) -> None:
        """One micro-batch of the step, in the order of its backward passes."""
        self.batches.append(batch)

    def cancel(self) -> None:
        """Restore the modules' modes and stop keeping gradients (the step did not finish)."""
        for m, training in self._modes:
            m.training = training
        self.pe.watch_sums(False)

    def finish(self, result: PerExampleResult, loss_of: Callable[[Any], Tensor]) -> None:
        """Check the step's result: example j's ‖∇ℓⱼ‖² per parameter against autograd's gradient
        of ``loss_of(example j as a batch of one)`` (a 0-dim loss with its graph, run with dropout
        off), up to one positive factor per example (a framework's loss may average over tokens
        or over micro-batches of unequal size, a scale pergrad cannot know), the pieces' sums
        having been checked exactly by ``pe.result``. The modes are restored in any case.

        Raises:
            VerificationError: naming the parameter, its module and the module's path.
            ValueError: the micro-batches do not hold the result's examples along their first axis.
        """
        try:
            sizes = [examples_in(b) for b in self.batches]
            if sum(sizes) != result.n:
                raise ValueError(
                    f"the step's micro-batches hold {sizes} examples along their first axis, but its backward "
                    f"passes measured {result.n}: the check against single examples cannot find them. Keep "
                    "every tensor of the batch examples-first, or pass verify=False to the callback."
                )

            def loss_of_example(j: int) -> Tensor:
                for k, size in enumerate(sizes):
                    if j < size:
                        return loss_of(example_of(self.batches[k], j, size))
                    j -= size
                raise IndexError(j)

            self.dropout_off()
            self.pe.check_result(result, loss_of_example, self.examples(result.n), up_to_factor=True)
        finally:
            self.cancel()
