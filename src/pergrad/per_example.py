"""PerExample: the batch gradient and per-example gradient quantities from one backward pass.

For losses ℓ₁…ℓₙ and the reduced loss L = (1/n) Σ ℓⱼ (``reduction="mean"``) or Σ ℓⱼ
(``"sum"``), autograd fills ``p.grad`` with ∇L as usual while the capture records, per
layer, the inputs ``a`` and output gradients ``g``. Each layer's rule splits ∇L into its n
pieces ``P_j`` (``∇L = Σ_j P_j``); the gradient of example j's own loss is then
``∇ℓⱼ = n·P_j`` for a mean and ``P_j`` for a sum.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import _tensors
from . import verify as _verify
from .capture import Capture, rule_of_calls
from .errors import CaptureError, VerificationError
from .rules import Keep, records
from .sharded import Sharding, global_sq_norms, local

__all__ = ["PerExample", "PerExampleResult"]

_REDUCTIONS = ("mean", "sum")

#: The check that every parameter's pieces add up to autograd's gradient runs on the first
#: backward of a model (with given settings, see :func:`pergrad.verify.checks_of`), on every
#: verified one, and on every this-many-th (about 15% of a small MLP's step on CPU, so not on
#: every one).
CHECK_SUMS_EVERY = 100


@dataclass(frozen=True)
class PerExampleResult:
    """What one :meth:`PerExample.backward` measured.

    Every per-example quantity is about the gradient of example j's *own* loss ∇ℓⱼ,
    whatever the reduction; only ``batch_grad_sq_norm`` depends on it.

    Attributes:
        sq_norms: (n,) ‖∇θ ℓⱼ‖² over all trainable parameters.
        param_sq_norms: {parameter name: (n,)} the same, per parameter.
        batch_grad_sq_norm: 0-dim tensor, ‖∇θ L‖² of the reduced loss (what this backward
            added to ``.grad``).
        n: number of examples.
        reduction: "mean" or "sum".
        grads: {parameter name: (n, *p.shape)} ∇θ ℓⱼ, when requested, else None.
        second_moment: {parameter name: p.shape} Σⱼ (∇θ ℓⱼ)², when requested, else None.
    """

    sq_norms: Tensor
    param_sq_norms: dict[str, Tensor]
    batch_grad_sq_norm: Tensor
    param_batch_grad_sq_norms: dict[str, Tensor]
    batch_grads: dict[str, Tensor]
    n: int
    reduction: str
    grads: dict[str, Tensor] | None = None
    second_moment: dict[str, Tensor] | None = None

    @property
    def norms(self) -> Tensor:
        """(n,) ‖∇θ ℓⱼ‖."""
        return self.sq_norms.sqrt()


class PerExample:
    """Per-example gradient norms (and, on request, gradients and second moments) of a model.

    Create it before the forward pass; it hooks the model until :meth:`remove` or the end of
    a ``with`` block. Parameter names are those of ``model.named_parameters()``; frozen
    parameters are skipped.

    Args:
        model: the model. Where each layer's input holds the examples is followed from the
            model's inputs through every operation of the forward pass (see
            :mod:`pergrad.axes`), never guessed from shapes.
        grads: also return per-example gradients, (n, *p.shape) per parameter.
        second_moment: also return Σⱼ (∇ℓⱼ)² per parameter.
        on_unsupported: what to do with a trainable module that has no registered rule (or
            that overrides the ``forward`` of a class that has one). "auto" (default): give its
            directly used parameters an example axis in the operations that use them, and
            compute a call whose operations cannot be followed with torch.func (see
            :attr:`paths`); "fallback": torch.func for such modules; "error": raise.
        verify: check per-example results against autograd's gradient of single examples'
            own losses (examples 0 and n−1, per parameter; it costs two more backward passes
            through the retained graph): "first" (default) on the model's first backward only,
            True on every backward, an int k ≥ 1 on the first and then one example (a
            different one each time) on every k-th backward, False never. A mismatch raises
            :class:`~pergrad.errors.VerificationError` naming the module and its path.
            "First" is per model, not per ``PerExample``: attaching again to a model already
            verified with the same modules, parameters and settings (``grads``,
            ``second_moment``, ``on_unsupported``, the layout) does not check again, so that ``with
            PerExample(model)`` around every step costs no check after the first
            (:func:`pergrad.verify.checks_of`); a model whose modules changed is checked again.
        batch_first: whether the model's inputs hold their examples along their first axis
            (default); False for the second, PyTorch's sequence-first layout (t, n, …).
        example_axes: {module path: axis} where a module's inputs hold their examples, for a
            module whose input comes out of an operation pergrad does not follow (the error
            that asks for it names the operation).

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> with PerExample(model) as pe:
        ...     losses = ((model(x) - y) ** 2).sum(1)       # (8,), one loss per example
        ...     result = pe.backward(losses)                # p.grad = ∇ losses.mean()
        >>> result.sq_norms.shape
        torch.Size([8])
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        grads: bool = False,
        second_moment: bool = False,
        on_unsupported: str = "auto",
        verify: bool | str | int = "first",
        batch_first: bool = True,
        example_axes: dict[str, int] | None = None,
    ):
        periodic = isinstance(verify, int) and not isinstance(verify, bool) and verify >= 1
        if not (verify is True or verify is False or verify == "first" or periodic):
            raise ValueError(f"verify must be True, False, 'first' or a number of backwards k >= 1, got {verify!r}.")
        self.model = model
        self.want_grads = grads
        self.want_second_moment = second_moment
        self.verify = verify
        self._directions: dict[str, tuple[Tensor, Tensor]] = {}
        #: the rows each rank holds of a model sharded with fully_shard (None for any other model);
        #: its hooks go first, to see the parameters the forward uses before the capture's swap them
        trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
        self._sharding = Sharding.of(model, trainable, self._direction)
        self._capture = Capture(model, on_unsupported, batch_first, example_axes)
        if self._sharding is not None:
            self._sharding.check_targets(self._capture.targets)
        self._capture.keep = Keep(grads=grads, second=second_moment)
        self._params = dict(self._capture.parameters())
        rules = tuple({id(t.rule): t.rule for t in self._capture.targets}.values())
        axes = tuple(sorted((example_axes or {}).items()))
        key = _verify.fingerprint(model, rules, (on_unsupported, grads, second_moment, batch_first, axes))
        self._checks = _verify.checks_of(model, key)  # shared by every PerExample of this model and key
        self._watched: dict[str, Tensor] | None = None  # see watch_sums
        self._watch_handles: list = []
        self._low_precision = False  # a gathered backward saw float16/bfloat16 gradients
        self._gathered: list[tuple[int, _PerParameter]] = []  # backwards run by someone else
        #: whether ``.grad`` is this worker's own gradient even in a process group (no_sync)
        self.local_grads = False
        self._pausing = 0  # depth of paused() blocks in progress
        self._capture.on_external_backward = self._gather

    def __enter__(self) -> PerExample:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook and saved tensor."""
        self.watch_sums(False)
        self._capture.remove()
        if self._sharding is not None:
            self._sharding.remove()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Measure nothing inside the block; the hooks stay attached (nothing to re-create after it).

        A forward pass inside it is not captured: no input or output gradient is kept, the example
        axis is not followed, no module's parameters are swapped or watched, so the forward and
        its backward cost what they cost without pergrad (plus a few Python calls per hooked
        module). A backward inside it (``loss.backward()``) is not gathered, whichever forward it
        belongs to; it fills ``.grad`` as usual. :meth:`backward` raises inside it.

        Which forward a backward measures is decided when the forward runs:

        - forward inside, backward after the block: not measured (nothing was captured): it adds
          to ``.grad`` but not to :meth:`result`, and :meth:`backward` on its losses raises
          :class:`~pergrad.errors.CaptureError` ("No forward pass was captured").
        - forward before the block, backward inside it: not measured, and that forward's captured
          tensors are dropped.
        - a backward whose forward was paused, then one whose forward was not: the first is not
          measured, the second is. Keep every micro-batch of one optimizer step on the same side:
          :meth:`result` would otherwise hold the measured micro-batches' examples while
          ``.grad`` (its ``batch_grads``) holds all of them, which :meth:`watch_sums` reports.

        Example:
            >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
            >>> x = torch.randn(8, 3)
            >>> with PerExample(model) as pe:
            ...     with pe.paused():                       # a step without statistics
            ...         model(x).pow(2).mean().backward()
            ...     result = pe.backward(model(x).pow(2).sum(1))   # a measured one
            >>> result.n
            8
        """
        self._pausing += 1
        try:
            with self._capture.paused():
                yield
        finally:
            self._pausing -= 1

    @property
    def is_paused(self) -> bool:
        """Whether a :meth:`paused` block is in progress."""
        return self._pausing > 0

    @property
    def paths(self) -> dict[str, str]:
        """{module path: how its per-example gradients are computed}, one entry per module
        with trainable parameters: ``"rule LinearRule"`` (a registered rule), ``"direct (mul,
        expand)"`` (its own parameters given an example axis in the operations named), or
        ``"torch.func (…)"`` (the module alone through torch.func, with the reason). Paths of
        direct modules are known after the first forward."""
        return self._capture.paths

    def backward(self, losses: Tensor, reduction: str = "mean", *, scaler=None) -> PerExampleResult:
        """Backpropagate the reduced loss once and measure every example's gradient.

        Args:
            losses: (n,) one loss per example, with a graph back to the model. An example's
                loss may itself sum or average over its tokens or pixels.
            reduction: "mean" leaves ∇ (1/n) Σ ℓⱼ in ``.grad``; "sum" leaves ∇ Σ ℓⱼ. Like
                autograd, the gradient is added to any ``.grad`` already there.
            scaler: a ``torch.amp.GradScaler`` for float16 training: the reduced loss is
                backpropagated as ``scaler.scale(L)``, so ``.grad`` holds the scaled gradient
                that ``scaler.step(optimizer)`` expects, while every per-example result and
                ``batch_grad_sq_norm`` are unscaled (divided by the scale, norms by its square).

        Returns:
            A :class:`PerExampleResult`.

        Raises:
            ValueError: ``reduction`` unknown; ``losses`` not of shape (n,), without a graph,
                or not finite (checked on CPU every step; on CUDA, where reading the check back
                would wait for the device, on the steps ``verify`` checks).
            CaptureError / ExampleCouplingError: see :meth:`Capture.check_before_backward`.
            VerificationError: see ``verify``.

        All but VerificationError are raised before anything is written into ``.grad``.
        """
        if self._pausing:
            raise CaptureError(
                "PerExample.backward inside pe.paused(): nothing is measured there. Call it after the "
                "block, or backpropagate the reduced loss yourself inside it (losses.mean().backward())."
            )
        n = _check_losses(losses, reduction)
        capture = self._capture
        capture.check_before_backward(n)
        checks = self._checks
        examples = self._examples_to_verify(n)
        verify = bool(examples)

        reduced = losses.mean() if reduction == "mean" else losses.sum()
        if verify or losses.device.type == "cpu":
            _check_finite(losses, reduced)
        loss_scale: float | Tensor = 1.0  # a 0-dim tensor under a scaler: no host sync on CUDA
        if scaler is not None and scaler.is_enabled():
            reduced = scaler.scale(reduced)
            loss_scale = _scale_of(scaler)
        params = self._params
        check_sums = (verify or checks.backwards % CHECK_SUMS_EVERY == 0) and self._grads_are_local()
        sharding = self._sharding
        earlier = {name: p.grad for name, p in params.items()}
        for p in params.values():
            p.grad = None
        capture.own_backward = True
        if sharding is not None:  # this rank's gradients, read before FSDP2 reduce-scatters them
            sharding.begin_backward(probe=check_sums)
        try:
            reduced.backward(retain_graph=verify)
        finally:
            capture.own_backward = False
            if sharding is not None:
                sharding.end_backward()
            fresh = {name: p.grad for name, p in params.items()}
            for name, p in params.items():
                if earlier[name] is not None:
                    p.grad = earlier[name] if fresh[name] is None else earlier[name] + fresh[name]

        zero = losses.new_zeros(()).detach() if any(g is None for g in fresh.values()) else None
        if sharding is None:
            param_batch_sq = _tensors.sq_norms(fresh, zero)
        else:
            param_batch_sq = sharding.local_sq_norms(fresh, losses)
        if isinstance(loss_scale, Tensor):
            param_batch_sq = {k: v / loss_scale**2 for k, v in param_batch_sq.items()}
        batch_sq = torch.stack(list(param_batch_sq.values())).sum()
        scale = (float(n) if reduction == "mean" else 1.0) / loss_scale
        low_precision = check_sums and capture.saw_low_precision()
        try:
            with torch.no_grad(), capture.paused():
                per_param = self._per_parameter(n, scale, params, probe=check_sums)
        finally:
            capture.clear()

        self._check_accounted([name for name, g in fresh.items() if g is not None], per_param.accounted)
        if check_sums:
            with torch.no_grad():
                self._check_pieces_add_up(per_param, fresh, scale, low_precision)
        sq_norms = per_param.stacked.sum(0)
        result = PerExampleResult(
            sq_norms=sq_norms,
            param_sq_norms=per_param.sq,
            batch_grad_sq_norm=batch_sq,
            param_batch_grad_sq_norms=param_batch_sq,
            batch_grads={k: torch.zeros_like(params[k]) if g is None else g for k, g in fresh.items()},
            n=n,
            reduction=reduction,
            grads=per_param.grads if self.want_grads else None,
            second_moment=per_param.second if self.want_second_moment else None,
        )
        if verify:
            capture.own_backward = True
            try:
                self._check_against_autograd(losses, result, low_precision, examples)
            finally:
                capture.own_backward = False
                capture.clear()  # calls of a checkpointed forward recomputed by those backwards
            checks.verified = True
        checks.backwards += 1  # counted once its checks passed: a backward that raised leaves them due
        return result

    def _examples_to_verify(self, n: int) -> list[int]:
        """The examples this backward checks against autograd (see ``verify``): 0 and n−1, one, or none."""
        checks, verify = self._checks, self.verify
        if verify is True or (verify is not False and not checks.verified):
            return sorted({0, n - 1})
        if isinstance(verify, (bool, str)) or checks.backwards % verify:
            return []
        return [(checks.backwards // verify) % n]

    def result(
        self, reduction: str = "mean", *, loss_scale: float = 1.0, grad_scale: float | None = None
    ) -> PerExampleResult:
        """What the backward passes run by someone else since the last call measured.

        With the hooks attached, an ordinary ``loss.backward()`` (a framework's, on the batch's
        mean or sum loss) is measured too: at its end, its examples' pieces are computed and
        kept, and the examples of several backward passes (micro-batches of one optimizer step)
        are gathered, in order, until this method reads them and starts a new gathering.

        Args:
            reduction: how the losses backpropagated since the last result relate to the B
                gathered examples' own losses ℓⱼ. "mean": they add up to (1/B) Σⱼ ℓⱼ (one
                backward of a batch's mean loss; K micro-batches' mean losses each divided by
                K; Hugging Face's token-summed loss over ``num_items_in_batch``, where example
                j's loss is then its summed token loss times B / (tokens in the batch)); the
                per-example gradient is B times its piece. "sum": they add up to Σⱼ ℓⱼ.
            loss_scale: the factor the backpropagated losses carried (``scaler.get_scale()``
                of a ``torch.amp.GradScaler``): per-example results are divided by it.
            grad_scale: the factor ``.grad`` carries now (default ``loss_scale``; 1.0 once
                the gradients were unscaled). ``batch_grads`` and ``batch_grad_sq_norm`` are
                read from ``.grad`` divided by it, so the gradients must have been zeroed
                before the step's first backward, as training loops do.

        Returns:
            A :class:`PerExampleResult` over the B gathered examples.

        Raises:
            CaptureError: no backward was measured since the last result.
            VerificationError: after :meth:`watch_sums`, pieces that do not add up.

        The first-backward check against autograd needs per-example losses, so it runs in
        :meth:`backward` only, not here; see :meth:`watch_sums` and :meth:`check_result` for the
        checks of backward passes run by someone else.
        """
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}.")
        if not self._gathered:
            raise CaptureError(
                "No backward pass was measured since the last result: run the forward and "
                "loss.backward() with PerExample attached (its hooks live until remove()) first."
            )
        parts, self._gathered = self._gathered, []
        if self._watched is not None:
            watched, low_precision = self._watched, self._low_precision
            self.watch_sums(False)
            with torch.no_grad():
                self._check_pieces_add_up(
                    _PerParameter.merged([part for _, part in parts]), watched, 1.0, low_precision
                )
        accounted = frozenset().union(*(part.accounted for _, part in parts))
        unseen = [k for k, p in self._params.items() if k not in accounted and p.grad is not None]
        self._check_accounted([k for k in unseen if bool(self._params[k].grad.any())], accounted)
        total = sum(n for n, _ in parts)
        scale = (float(total) if reduction == "mean" else 1.0) / loss_scale
        names = list(self._params)
        sq = {k: torch.cat([part.sq[k] for _, part in parts]) * scale**2 for k in names}
        grads = {k: torch.cat([part.grads[k] for _, part in parts]) * scale for k in names} if self.want_grads else None
        second = None
        if self.want_second_moment:
            second = {k: sum(part.second[k] for _, part in parts) * scale**2 for k in names}
        unscale = loss_scale if grad_scale is None else grad_scale
        batch = {
            k: (torch.zeros_like(p) if p.grad is None else p.grad.detach() / unscale) for k, p in self._params.items()
        }
        if self._sharding is None:
            param_batch_sq = _tensors.sq_norms(batch, torch.zeros((), dtype=torch.float64))
        else:
            param_batch_sq = global_sq_norms(batch)
        return PerExampleResult(
            sq_norms=torch.stack(list(sq.values())).sum(0),
            param_sq_norms=sq,
            batch_grad_sq_norm=torch.stack(list(param_batch_sq.values())).sum(),
            param_batch_grad_sq_norms=param_batch_sq,
            batch_grads=batch,
            n=total,
            reduction=reduction,
            grads=grads,
            second_moment=second,
        )

    def reset(self) -> None:
        """Drop every captured call and every gathered backward."""
        self._gathered.clear()
        self._capture.clear()

    def watch_sums(self, on: bool = True) -> None:
        """Make the next :meth:`result` check that the gathered pieces add up to the gradients
        of the backward passes gathered (:meth:`_check_pieces_add_up`, which :meth:`backward`
        runs itself): from now until that result, a gradient hook on every parameter adds up what
        each backward computes, before any clipping or averaging over workers. ``on=False``
        stops it. Under FSDP2 the hooks on the unsharded parameters read each backward's gradient
        of this rank's loss (:meth:`Sharding.watch`), before the reduce-scatter."""
        for handle in self._watch_handles:
            handle.remove()
        self._watch_handles, self._watched = [], None
        if self._sharding is not None:
            self._sharding.watch(on)
        if not on:
            return  # (the low-precision flag stays for check_result on the result just read)
        self._low_precision = False
        if self._sharding is not None:  # read from the Sharding by _check_pieces_add_up
            self._watched = {}
            return
        self._watched = {
            name: torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32))
            for name, p in self._params.items()
        }
        for name, p in self._params.items():
            self._watch_handles.append(p.register_hook(_tensors.adder(self._watched[name])))

    def check_result(
        self,
        result: PerExampleResult,
        loss_of: Callable[[int], Tensor],
        examples: list[int],
        *,
        up_to_factor: bool = False,
    ) -> None:
        """Compare a result of backward passes run by someone else with autograd on single examples.

        For each j in ``examples``: ‖∇ℓⱼ‖² per parameter in ``result`` against autograd's gradient
        of ``loss_of(j)``, example j's own loss recomputed alone (0-dim, with its graph), with
        the capture paused and ``.grad`` stashed and restored; the comparison and tolerance of
        :meth:`backward`'s check (:func:`pergrad.verify.worst_mismatch`).

        Args:
            result: from :meth:`result`.
            loss_of: example j's loss, computed by the caller (a framework's loss on a batch
                of one).
            examples: indices into the result's examples.
            up_to_factor: compare up to one positive factor per example, where ``loss_of``'s
                scale relative to the result's per-example loss is not known.

        Raises:
            VerificationError: naming the parameter, its module and the module's path.

        Under FSDP2 it is collective: autograd's gradient is taken with respect to the unsharded
        parameters the recomputed forward used (``torch.autograd.grad``, :meth:`Sharding.example_grads`),
        and every rank checks two examples (the first and last of ``examples``), so that FSDP2's
        gathers meet on every rank.
        """
        params = self._params
        dtype = next(iter(params.values())).dtype if params else torch.float32
        rtol = _verify.tolerance(dtype, self._low_precision or dtype in (torch.float16, torch.bfloat16))
        if self._sharding is not None:
            examples = [examples[0], examples[-1]]
        stash = {name: p.grad for name, p in params.items()}
        try:
            with self._capture.paused():
                for j in examples:
                    want = self._single_example_sq_norms(loss_of(j))
                    got = {name: float(result.param_sq_norms[name][j]) for name in want}
                    bad = _verify.worst_mismatch(got, want, rtol, up_to_factor=up_to_factor)
                    if bad is not None:
                        raise VerificationError(self._mismatch(bad[0], j, bad[1], bad[2]))
        finally:
            for name, p in params.items():
                p.grad = stash[name]

    def _single_example_sq_norms(self, loss: Tensor) -> dict[str, float]:
        """{name: ‖∇ loss‖²} by autograd, ``.grad`` left as it was; under FSDP2 with respect to the
        unsharded parameters (``.grad`` untouched), else through ``loss.backward``."""
        if self._sharding is None:
            return _verify.single_example_sq_norms(self._params, loss)
        found = self._sharding.example_grads(loss, self._params, retain_graph=False)
        grads = {name: found.get(name) for name in self._params}
        return {name: 0.0 if g is None else float(g.double().square().sum()) for name, g in grads.items()}

    def _gather(self) -> None:
        """At the end of a backward run by someone else: its examples' pieces, kept for
        :meth:`result` (pieces of whatever loss was backpropagated: scale 1)."""
        capture = self._capture
        if self._pausing:  # a backward inside paused(): not measured, whichever forward it belongs to
            capture.clear()
            return
        n = capture.examples_reached()
        if n is None:
            return
        capture.check_before_backward(n)
        watching = self._watched is not None
        if watching:
            self._low_precision = self._low_precision or capture.saw_low_precision()
        try:
            with torch.no_grad(), capture.paused():
                self._gathered.append((n, self._per_parameter(n, 1.0, self._params, probe=watching)))
        finally:
            capture.clear()

    def _check_against_autograd(
        self, losses: Tensor, result: PerExampleResult, low_precision: bool, examples: list[int]
    ) -> None:
        """Compare ‖∇ℓⱼ‖² per parameter with autograd's, for j in ``examples``, through the
        retained graph (``.grad`` is stashed and restored; plain ``backward`` so that
        reentrant activation checkpointing works too), with the tolerance of
        :func:`pergrad.verify.tolerance` and the comparison of :func:`pergrad.verify.worst_mismatch`.

        Raises:
            VerificationError: naming the parameter, its module and the module's path.
        """
        params = self._params
        dtype = next(iter(params.values())).dtype if params else torch.float32
        rtol = _verify.tolerance(dtype, low_precision)
        if self._sharding is not None:  # as many backward passes on every rank (FSDP2 gathers in each)
            examples = [examples[0], examples[-1]]
        stash = {name: p.grad for name, p in params.items()}
        try:
            for k, j in enumerate(examples):
                grads = self._example_grads(losses[j], retain_graph=k < len(examples) - 1)
                want = {name: 0.0 if g is None else float(g.double().square().sum()) for name, g in grads.items()}
                got = {name: float(result.param_sq_norms[name][j]) for name in want}
                bad = _verify.worst_mismatch(got, want, rtol)
                if bad is not None:
                    raise VerificationError(self._mismatch(bad[0], j, bad[1], bad[2]))
        finally:
            for name, p in params.items():
                p.grad = stash[name]

    def _example_grads(self, loss: Tensor, retain_graph: bool) -> dict[str, Tensor | None]:
        """{name: ∇ loss} of one example's loss by autograd (``.grad`` is stashed by the caller);
        under FSDP2, with respect to the unsharded parameters the forward used."""
        params = self._params
        if self._sharding is not None:
            found = self._sharding.example_grads(loss, params, retain_graph)
            return {name: found.get(name) for name in params}
        for p in params.values():
            p.grad = None
        loss.backward(retain_graph=retain_graph)
        return {name: p.grad for name, p in params.items()}

    def _grads_are_local(self) -> bool:
        """Whether ``.grad`` holds this process's own gradient: not in a process group of several
        workers, where DistributedDataParallel may average it during the backward pass, unless
        the backward is known to run under ``no_sync`` (set by DistributedPerExample)."""
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        return (
            self.local_grads or self._sharding is not None or not distributed or torch.distributed.get_world_size() == 1
        )

    def _direction(self, name: str, p: Tensor) -> tuple[Tensor, Tensor]:
        """(x (R,), y (C,)): a fixed random rank-one direction of parameter ``name`` seen as an
        (R, C) matrix, standard normal entries, at least float32."""
        found = self._directions.get(name)
        if found is None or found[0].device != p.device:
            rows, cols = records.matrix_shape(p.shape)
            gen = torch.Generator().manual_seed(len(self._directions))
            dtype = torch.promote_types(p.dtype, torch.float32)
            x, y = torch.randn(rows, generator=gen, dtype=dtype), torch.randn(cols, generator=gen, dtype=dtype)
            found = self._directions[name] = (x.to(p.device), y.to(p.device))
        return found

    def _check_pieces_add_up(self, per_param: _PerParameter, fresh: dict, scale, low_precision: bool) -> None:
        """Check that each parameter's per-example pieces add up to the batch gradient autograd
        computed, along the fixed random direction x yᵀ of :meth:`_direction`: ``|xᵀ(Σⱼ P_j)y −
        xᵀ(∇L)y| ≤ rtol·(s + 10⁻³·max s)`` with ``s = ‖∇L‖ + Σⱼ ‖P_j‖`` of the parameter and the
        largest over parameters (a floor for gradients that vanish up to rounding, as a key bias's
        under softmax), rtol 1e-8 in float64, 1e-3 in float32, 5e-2 under float16/bfloat16 autocast.
        It costs about one more pass over the gradients and one read
        on the host, on the steps :data:`CHECK_SUMS_EVERY` says, and catches a use of a parameter
        that no rule or traced operation saw, and pieces that do not sum to the gradient,
        whatever ``verify`` says. (Parameters whose pieces were reduced in the backward pass sum
        to the gradient by construction and are not probed.)

        Raises:
            VerificationError: naming the first parameter whose pieces do not add up.
        """
        names = list(per_param.probes)
        if not names:
            return
        params = self._params
        if self._sharding is None:
            grads = [fresh[k] if fresh[k] is not None else torch.zeros_like(params[k]) for k in names]
            want = torch.stack([self._probe_grad(k, g) for k, g in zip(names, grads, strict=True)])
            grad_norms = torch.stack(torch._foreach_norm(grads)).to(want.dtype)
        else:  # this rank's gradients, as its backward gave them to FSDP2
            local = self._sharding.local_probes(names)
            zero = per_param.probes[names[0]].new_zeros(())
            want = torch.stack([zero if local[k] is None else local[k].to(zero.dtype) for k in names])
            grad_norms = torch.stack(list(self._sharding.local_sq_norms(names, zero).values())).to(want.dtype).sqrt()
        got = torch.stack([per_param.probes[k].to(want.dtype) for k in names])
        piece_norms = torch.stack([per_param.sq[k].sqrt().sum() for k in names]).to(want.dtype) / abs(scale)
        dtype = params[names[0]].dtype
        rtol = 5e-2 if low_precision else 1e-8 if dtype == torch.float64 else 1e-3
        size = grad_norms + piece_norms
        bad = ((got - want).abs() > rtol * (size + 1e-3 * size.max())).nonzero().flatten().tolist()
        if bad:
            k = bad[0]
            name = names[k]
            owner = self._owner(name)
            raise VerificationError(
                f"the per-example pieces of '{name}' ({owner.describe()}, {owner.path_taken()}) do not add "
                f"up to autograd's gradient of the batch ({float(got[k]):.6g} against {float(want[k]):.6g} "
                "along a random direction): the parameter is used where pergrad did not see it (an "
                "operation outside the module that owns it) or its rule misreads the module. Use the "
                "parameter through the module that owns it, register a rule for the module that uses it, "
                "or pass on_unsupported='fallback' (under DistributedDataParallel with DistributedPerExample, "
                "run each backward inside ddp.no_sync()). Please report the model."
            )

    def _probe_grad(self, name: str, grad: Tensor) -> Tensor:
        """0-dim xᵀ grad y along the parameter's direction."""
        x, y = self._direction(name, grad)
        return x @ grad.to(x.dtype).reshape(x.shape[0], -1) @ y

    def _check_accounted(self, reached: list[str], accounted: frozenset[str]) -> None:
        """Raise if a parameter that a gradient reached had no records: a use of it that the
        capture did not see, whose per-example gradients would otherwise read as zeros.

        Raises:
            CaptureError: naming the parameter and its module.
        """
        missing = [name for name in reached if name not in accounted]
        if not missing:
            return
        owner = self._owner(missing[0])
        raise CaptureError(
            f"'{missing[0]}' ({owner.describe()}) received a gradient, but pergrad saw no operation "
            "that uses it: it is used where no rule or traced operation accounts for it (inside an "
            "op that takes it in a list, as _VF.lstm does, or by a module that does not own it). "
            f"Register a rule for {type(owner.module).__name__} (pergrad.register_rule), pass "
            "on_unsupported='fallback', or use the parameter through the module that owns it."
        )

    def _owner(self, name: str):
        """The first target that covers a parameter."""
        return next(t for t in self._capture.targets if name in t.param_names.values())

    def _mismatch(self, name: str, j: int, got: float, want: float) -> str:
        owner = self._owner(name)
        return (
            f"per-example gradient of '{name}' ({owner.describe()}, {owner.path_taken()}) is wrong: "
            f"‖∇ℓ_{j}‖² = {got:.6g} here, {want:.6g} by autograd on example {j}'s own loss. "
            "The module's computation is not what its rule assumes: register a rule for its class "
            "(pergrad.register_rule), or pass on_unsupported='fallback' and make sure it has no "
            "registered parent class whose forward it overrides. Please report the model."
        )

    def _per_parameter(
        self, n: int, scale: float, params: dict[str, nn.Parameter], probe: bool = False
    ) -> _PerParameter:
        """Every target's records, gathered by parameter name, turned into results, rescaled.

        A parameter gets the records of every module that used it (tied weights, a module
        called twice); :mod:`.rules.records` adds their cross terms. A parameter no gradient
        reached gets zeros. The squared norms of all parameters are scaled at once, as one
        (P, n) tensor whose rows ``sq`` holds as views. With ``probe``, each parameter's pieces'
        sum along its random direction is kept for :meth:`_check_pieces_add_up`.
        """
        found = self._records(n)
        sharding = self._sharding
        probes: dict[str, Tensor] = {}  # the pieces' sums along a random direction, unscaled
        sq: dict[str, Tensor] = {}  # unscaled
        grads: dict[str, Tensor] = {}
        second: dict[str, Tensor] = {}
        for name, p in params.items():
            records_of_p = found.get(name)
            shape = p.shape if sharding is None else sharding.local_shape(name)  # this rank's rows
            like = local(p)
            if not records_of_p:  # no gradient reached it
                sq[name] = like.new_zeros(n)
                if self.want_grads:
                    grads[name] = like.new_zeros((n, *shape))
                if self.want_second_moment:
                    second[name] = (
                        torch.zeros_like(like) if sharding is None else sharding.second_moment(name, [], scale, p)
                    )
                continue
            sq[name] = records.sq_norms(records_of_p, p.shape)
            if probe:
                value = records.probe(records_of_p, p.shape, *self._direction(name, p))
                if value is not None:
                    probes[name] = value
            if sharding is not None:
                if self.want_grads:
                    mine = sharding.local_records(name, records_of_p)
                    grads[name] = records.pieces(mine, shape) * scale if mine else like.new_zeros((n, *shape))
                if self.want_second_moment:
                    second[name] = sharding.second_moment(name, records_of_p, scale, p)
                continue
            if self.want_grads:
                grads[name] = records.pieces(records_of_p, p.shape) * scale
            if self.want_second_moment:
                second[name] = records.second_moment(records_of_p, p.shape) * scale**2
        stacked = torch.stack([sq[name] for name in params]) * scale**2  # (P, n)
        return _PerParameter(
            stacked=stacked,
            sq=dict(zip(params, stacked.unbind(), strict=True)),
            grads=grads,
            second=second,
            accounted=frozenset(found),
            probes=probes,
        )

    def _records(self, n: int) -> dict[str, list[records.Record]]:
        """{parameter name: its records} from every target's calls that the last backward reached."""
        found: dict[str, list[records.Record]] = {}
        for target in self._capture.targets:
            calls = self._capture.reached_calls(target, n)
            if not calls:
                continue
            rule = rule_of_calls(target, calls)
            for name, recs in rule.records(target.module, calls).items():
                found.setdefault(target.param_names[name], []).extend(recs)
        return found


@dataclass
class _PerParameter:
    """Per-parameter results by name: squared norms (n,), gradients, second moments;
    ``stacked`` (P, n) holds the squared norms in parameter order (``sq``'s values are its rows);
    ``accounted`` the parameters whose uses the capture saw (the others got zeros)."""

    stacked: Tensor
    sq: dict[str, Tensor] = field(default_factory=dict)
    grads: dict[str, Tensor] = field(default_factory=dict)
    second: dict[str, Tensor] = field(default_factory=dict)
    accounted: frozenset[str] = frozenset()  # the parameters that had records
    probes: dict[str, Tensor] = field(default_factory=dict)  # see PerExample._check_pieces_add_up

    @staticmethod
    def merged(parts: list[_PerParameter]) -> _PerParameter:
        """The squared norms and probes of several backwards' parts (scale 1) as one, for
        :meth:`PerExample._check_pieces_add_up`: norms concatenated, probes added."""
        names = list(parts[0].sq)
        sq = {k: torch.cat([part.sq[k] for part in parts]) for k in names}
        probes = {
            k: sum(part.probes[k] for part in parts) for k in parts[0].probes if all(k in part.probes for part in parts)
        }
        return _PerParameter(stacked=torch.stack(list(sq.values())), sq=sq, probes=probes)


def _check_losses(losses: Tensor, reduction: str) -> int:
    """Validate the per-example losses; return n."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}.")
    if not isinstance(losses, Tensor):
        raise ValueError(f"losses must be a tensor of shape (n,), got {type(losses).__name__}.")
    if losses.dim() != 1:
        hint = (
            "a scalar: the loss was already reduced over the batch. Compute one loss per "
            "example, e.g. F.cross_entropy(logits, y, reduction='none')"
            if losses.dim() == 0
            else f"of shape {tuple(losses.shape)}: reduce each example's loss over its other "
            "axes first, e.g. losses.reshape(n, -1).mean(1)"
        )
        raise ValueError(f"losses must have shape (n,), one loss per example, but it is {hint}.")
    if losses.shape[0] == 0:
        raise ValueError("losses is empty: a batch needs at least one example.")
    if losses.grad_fn is None:
        raise ValueError(
            "losses has no graph back to the model: compute it from the model's output with "
            "gradients enabled (not under torch.no_grad(), not .detach()ed)."
        )
    return losses.shape[0]


def _scale_of(scaler) -> Tensor | float:
    """The loss scale of a ``torch.amp.GradScaler`` that has just scaled a loss: its scale
    tensor (reading ``get_scale()`` would wait for the device), or the float where it has none."""
    scale = getattr(scaler, "_scale", None)
    return scale.detach().reshape(()) if isinstance(scale, Tensor) else float(scaler.get_scale())


def _check_finite(losses: Tensor, reduced: Tensor) -> None:
    """Raise if the reduced loss is NaN or infinite (then some loss is, or their sum overflows).

    One scalar test, read on the host: on CUDA, where that waits for the forward to finish,
    :meth:`PerExample.backward` calls it only on the steps it verifies.
    """
    if math.isfinite(reduced.item()):  # one scalar read (cheaper than a tensor op and bool())
        return
    bad = (~torch.isfinite(losses.detach())).nonzero().flatten().tolist()
    where = f"losses of examples {bad[:10]} are NaN or infinite" if bad else "the losses' sum overflows"
    raise ValueError(f"{where}; fix the data or the model first.")
