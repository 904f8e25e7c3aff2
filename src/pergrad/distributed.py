"""Data-parallel workers and gradient accumulation: one optimizer step over many micro-batches.

The averaging identity carries across workers. If W workers each run K micro-batches and sum
their examples' gradients, with B examples in the whole step,

    ∇θ (1/B) Σⱼ ℓⱼ = (1/B) Σ_w Σ_k Σ_{j ∈ micro-batch (w, k)} ∇θ ℓⱼ,

so one sum ``all_reduce`` of the workers' summed gradients, divided by B, is the gradient of the
global batch's mean loss, whatever W and K. The per-example statistics are sums as well
(Σⱼ ‖gⱼ‖², Σⱼ gⱼ², the counts), so they merge with ONE more ``all_reduce`` of a flat float64
vector, and equal those of one process on the concatenated batch up to rounding.

The micro-batches also give the two-batch estimator of McCandlish et al. for free: the mean
over the M micro-batches of ‖ḡ_m‖² (small batches, read by each backward) against ‖ḡ‖² of the
global batch (with K = 1, a micro-batch is one worker's batch).

In your own DDP loop (a complete one: ``torchrun --nproc_per_node 2 examples/ddp_noise_scale.py``)::

    ddp = DistributedDataParallel(model)
    with pergrad.DistributedPerExample(model, second_moment=True) as dpe:
        for micro_batches in loader:                     # this worker's K micro-batches of a step
            optimizer.zero_grad(set_to_none=True)
            for x, y in micro_batches:
                with ddp.no_sync():                      # pergrad reduces the gradient itself
                    dpe.backward(loss_fn(ddp(x), y))     # (n_m,) losses, summed
            step = dpe.step()                            # p.grad: the global batch's mean gradient
            optimizer.step()
            noise.update_estimate(step.estimate(), step.names)

References:
    McCandlish et al. 2018, "An Empirical Model of Large-Batch Training", arXiv:1812.06162
    (the two-batch estimator, appendix A).
    Li et al. 2020, "PyTorch Distributed: Experiences on Accelerating Data Parallel Training",
    arXiv:2006.15704 (DistributedDataParallel).
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ._tensors import flatten, sq_norms
from .per_example import PerExample, PerExampleResult
from .sharded import Sharding, global_sq_norms, is_sharded, local
from .stats.batch import BatchEstimate, per_example_estimate, two_batch_estimate, weighted_sq_norms

__all__ = [
    "DistributedPerExample",
    "StepResult",
    "all_gather_cat",
    "broadcast_object",
    "check_same_settings",
    "init_from_env",
    "merge_result",
    "shutdown",
    "no_sync",
    "rank_and_world",
]

_SCALARS = 4  # n, M, Σₘ ‖ḡₘ‖², Σₘ 1/bₘ at the head of the merged vector
_MIXED = (
    "a step's micro-batches must all be measured or all run inside dpe.paused(): the statistics of a step "
    "describe its whole batch. Enter or leave paused() between optimizer steps."
)


@dataclass(frozen=True)
class StepResult:
    """One optimizer step over every micro-batch of every worker, merged (the same on all ranks).

    P is the number of trainable parameters, in ``names`` order.

    Attributes:
        n: B, the examples of the step over all workers and micro-batches.
        names: (P,) the parameter names.
        sq_norm_sums: (1+P,) float64 Σⱼ ‖gⱼ‖² over the B examples, in total then per parameter.
        grad_sq_norms: (1+P,) float64 ‖ḡ‖² of the global mean gradient ḡ = (1/B) Σⱼ gⱼ.
        mean_grads: {name: p.shape} ḡ, which is also what ``p.grad`` now holds.
        second_moment: {name: p.shape} float64 Σⱼ gⱼ², or None if not requested.
        micro_batches: M, the non-empty micro-batches over all workers (0 from
            :func:`merge_result`, where they were not seen apart).
        micro_sq_norm_sum: Σₘ ‖ḡₘ‖², ḡₘ the mean gradient of micro-batch m.
        micro_inv_size_sum: Σₘ 1/bₘ, bₘ the size of micro-batch m.
        sums: (k,) float64 the caller's own sums (``step(sums=...)``), added over workers.
    """

    n: int
    names: tuple[str, ...]
    sq_norm_sums: Tensor
    grad_sq_norms: Tensor
    mean_grads: dict[str, Tensor]
    second_moment: dict[str, Tensor] | None
    micro_batches: int
    micro_sq_norm_sum: float
    micro_inv_size_sum: float
    sums: Tensor

    def estimate(
        self, population_size: int | None = None, preconditioner: Mapping[str, Tensor] | None = None
    ) -> BatchEstimate:
        """Per-example tr Σ̂ and |G|²̂ of the global batch: (1+P,) float64, total then per parameter.

        tr Σ̂ = B/(B−1) (Σⱼ ‖gⱼ‖² / B − ‖ḡ‖²), |G|²̂ = ‖ḡ‖² − tr Σ̂ / B: exactly
        :func:`pergrad.stats.batch_estimate` of one process on the concatenated batch (NaN,
        with a :class:`~pergrad.stats.StatsWarning`, for a step of fewer than 2 examples).
        With ``preconditioner`` ({name: p.shape} diagonal P, e.g. ``noise.preconditioner()``),
        tr(PΣ)̂ and GᵀPĜ from the merged second moments (which must have been requested).
        """
        if preconditioner is None:
            return per_example_estimate(self.sq_norm_sums / self.n, self.grad_sq_norms, self.n, population_size)
        if self.second_moment is None:
            raise ValueError("a preconditioned estimate needs DistributedPerExample(model, second_moment=True).")
        mean_sq, batch_sq = weighted_sq_norms(self.second_moment, self.mean_grads, self.n, preconditioner)
        return per_example_estimate(mean_sq, batch_sq, self.n, population_size)

    def two_batch_estimate(self, population_size: int | None = None) -> BatchEstimate | None:
        """tr Σ̂ and |G|²̂ (floats) from micro-batch against global-batch gradient norms.

        The small batch is a micro-batch (one worker's batch when K = 1): mean ‖ḡₘ‖² over the
        M micro-batches, at their harmonic mean size M / Σ 1/bₘ, against ‖ḡ‖² at B. None when
        M < 2 (one process without accumulation: nothing to compare).

        References:
            McCandlish et al. 2018, arXiv:1812.06162, appendix A.
        """
        if self.micro_batches < 2:
            return None
        small = self.micro_sq_norm_sum / self.micro_batches
        harmonic = self.micro_batches / self.micro_inv_size_sum
        return two_batch_estimate(small, float(self.grad_sq_norms[0]), harmonic, self.n, population_size)


class DistributedPerExample:
    """:class:`~pergrad.PerExample` over micro-batches and data-parallel workers.

    Call :meth:`backward` on each of this worker's micro-batches (inside ``ddp.no_sync()`` if
    the model is wrapped in DistributedDataParallel: pergrad reduces the gradient itself, once
    per step), then :meth:`step`: it all-reduces the summed gradients (one ``all_reduce``) and the
    statistics (one ``all_reduce`` of a flat float64 vector), and leaves in ``p.grad`` the mean
    gradient of the global batch. Without an initialised process group it is plain gradient
    accumulation in one process.

    Zero the gradients (``optimizer.zero_grad()``) before a step's first micro-batch.

    Args:
        model: the module whose parameters are trained: the model itself, not its DDP wrapper
            (``ddp.module``), so that parameter names carry no ``module.`` prefix.
        second_moment: also merge Σⱼ gⱼ² per parameter (for :class:`~pergrad.ParamSNR`).
        group: the process group (default: the world).
        on_unsupported: as for :class:`~pergrad.PerExample`.
        verify: as for :class:`~pergrad.PerExample` (each micro-batch's backward runs under
            ``no_sync``, so the first one's check is local to the worker).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        second_moment: bool = False,
        group: dist.ProcessGroup | None = None,
        on_unsupported: str = "auto",
        verify: bool | str = "first",
    ):
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise ValueError(
                "DistributedPerExample got the DistributedDataParallel wrapper: pass the wrapped "
                "model (ddp.module), and run the forward through the wrapper as usual."
            )
        self._pe = PerExample(model, second_moment=second_moment, on_unsupported=on_unsupported, verify=verify)
        self._pe.local_grads = True  # its backward passes run under no_sync
        #: the rows of a fully_shard model's parameters (None for any other model)
        self._sharding = self._pe._sharding
        self._params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        self.second_moment = second_moment
        self.group = group
        self._reset()

    def __enter__(self) -> DistributedPerExample:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove the engine's hooks."""
        self._pe.remove()

    @contextlib.contextmanager
    def paused(self):
        """A step without statistics: inside the block the hooks capture nothing (see
        :meth:`PerExample.paused <pergrad.PerExample.paused>`), :meth:`backward` backpropagates
        Σⱼ ℓⱼ alone and returns None, and :meth:`plain_step` (not :meth:`step`) ends the step::

            with dpe.paused():
                for x, y in micro_batches:
                    with ddp.no_sync():
                        dpe.backward(loss_fn(ddp(x), y))
                n, sums = dpe.plain_step(sums)       # p.grad: the global batch's mean gradient

        Every micro-batch of a step must be on the same side of the block (:meth:`step` and
        :meth:`plain_step` raise otherwise).
        """
        with self._pe.paused():
            yield

    def plain_step(self, sums: Tensor | None = None) -> tuple[int, Tensor]:
        """End a step whose micro-batches ran inside :meth:`paused`: leave the global batch's mean
        gradient in ``p.grad``, as :meth:`step` does, and measure nothing.

        Collective: every rank of the group must call it, with ``sums`` of the same length.

        Args:
            sums: (k,) numbers of your own to add over workers, or None.

        Returns:
            (B, the examples of the step over all workers; (k,) float64 ``sums`` added over them).

        Raises:
            ValueError: a micro-batch of the step was measured (call :meth:`step`), or no example
                on any worker.
        """
        if self._micro:
            raise ValueError(
                "plain_step ends a step whose micro-batches all ran inside dpe.paused(), but this one "
                f"measured {self._micro}: call step(), or run every micro-batch of the step inside paused()."
            )
        extra = torch.zeros(0) if sums is None else sums.detach().reshape(-1)
        head = torch.cat([torch.tensor([float(self._n)]), extra.to("cpu", torch.float64)]).to(torch.float64)
        if _world(self.group) > 1:
            head = _on_backend_device(head, self.group)
            dist.all_reduce(head, group=self.group)
            head = head.cpu()
        n = int(head[0])
        if n == 0:
            raise ValueError("the step had no example on any worker: call backward on at least one micro-batch first.")
        if self._sharding is None:
            self._reduce_grads(n, _world(self.group))
        else:
            self._scale_sharded_grads(n)
        self._reset()
        return n, head[1:]

    def idle_backward(self, model: nn.Module, empty: Tensor) -> None:
        """A forward and backward of no example, uncaptured: for a worker without examples in a
        micro-batch of a ``fully_shard`` model, whose gathers and reduce-scatters need every rank.

        Args:
            model: the model (as for the forward of a micro-batch).
            empty: (0, ...) an input of no example.
        """
        with self._pe._capture.paused():
            out = model(empty)
            (out.sum() * 0).backward()

    def _reset(self) -> None:
        p = len(self._params)
        self._n = 0
        self._micro = 0
        self._plain = 0  # micro-batches backpropagated inside paused()
        self._micro_sq = 0.0
        self._micro_inv = 0.0
        self._sq_sums = torch.zeros(1 + p, dtype=torch.float64)
        self._second = None
        if self.second_moment:
            shape = {name: q.shape for name, q in self._params.items()}
            if self._sharding is not None:  # this rank's rows, already summed over the ranks
                shape = {name: self._sharding.local_shape(name) for name in shape}
            self._second = {name: torch.zeros(s, dtype=torch.float64) for name, s in shape.items()}

    def backward(self, losses: Tensor) -> PerExampleResult | None:
        """Backpropagate Σⱼ ℓⱼ of one micro-batch (added to ``.grad``) and keep its statistics.

        Args:
            losses: (n_m,) this micro-batch's per-example losses, n_m ≥ 1.

        Returns:
            The micro-batch's :class:`~pergrad.PerExampleResult` (``reduction="sum"``); None
            inside :meth:`paused`, where Σⱼ ℓⱼ is backpropagated and nothing measured.
        """
        if self._pe.is_paused:
            if self._micro:
                raise ValueError(_MIXED)
            losses.sum().backward()
            self._n += losses.shape[0]
            self._plain += 1
            return None
        if self._plain:
            raise ValueError(_MIXED)
        result = self._pe.backward(losses, reduction="sum")
        n = result.n
        per_param = [result.param_sq_norms[name].sum() for name in self._params]
        per_example = torch.stack([result.sq_norms.sum(), *per_param])
        self._sq_sums += per_example.detach().to("cpu", torch.float64)
        self._n += n
        self._micro += 1
        self._micro_sq += float(result.batch_grad_sq_norm) / n**2  # ‖ḡₘ‖² = ‖Σ gⱼ‖² / nₘ²
        self._micro_inv += 1.0 / n
        if self._second is not None:
            for name, m in result.second_moment.items():  # sharded: this rank's rows, over all ranks
                self._second[name] += local(m).detach().to("cpu", torch.float64)
        return result

    def step(self, sums: Tensor | None = None) -> StepResult:
        """Merge the micro-batches of all workers; leave the global mean gradient in ``p.grad``.

        Collective: every rank of the group must call it, with ``sums`` of the same length.

        Args:
            sums: (k,) numbers of your own to add over workers in the same ``all_reduce``
                (summed losses, correct predictions...), or None.

        Returns:
            A :class:`StepResult`, identical on every rank.

        Raises:
            ValueError: no example in the step on any worker.
        """
        if self._plain:
            raise ValueError(
                f"{self._plain} micro-batch(es) of this step ran inside dpe.paused(), unmeasured: end the step with "
                "plain_step(), or run every micro-batch of the step outside paused()."
            )
        head = torch.tensor([self._n, self._micro, self._micro_sq, self._micro_inv], dtype=torch.float64)
        sharding = self._sharding
        second = self._second if sharding is None else None  # sharded: reduce-scattered by each backward
        merged = _merge_sums(head, self._sq_sums, sums, second, self._params, self.group)
        if merged.n == 0:
            raise ValueError("the step had no example on any worker: call backward on at least one micro-batch first.")
        if sharding is None:
            result = merged.step_result(self._reduce_grads(merged.n, _world(self.group)))
        else:
            second = (
                None
                if self._second is None
                else {k: Sharding.to_dtensor(m, self._params[k]) for k, m in self._second.items()}
            )
            result = _sharded_step_result(merged, self._scale_sharded_grads(merged.n), second)
        self._reset()
        return result

    def _scale_sharded_grads(self, n: int) -> dict[str, Tensor]:
        """FSDP2 reduce-scattered each backward's Σⱼ gⱼ averaged over its W ranks into the sharded
        ``.grad``: times W/n it is the global mean gradient; returns {name: p.grad}."""
        world = self._sharding.world
        with torch.no_grad():
            for q in self._params.values():
                if q.grad is None:
                    q.grad = torch.zeros_like(q)
                else:
                    q.grad.mul_(world / n)
        return {name: q.grad for name, q in self._params.items()}

    def _reduce_grads(self, n: int, world: int) -> dict[str, Tensor]:
        """Sum ``.grad`` over workers (one flat all_reduce) and divide by n; returns {name: p.grad}."""
        params = self._params
        for q in params.values():
            if q.grad is None:
                q.grad = torch.zeros_like(q)
        grads = [q.grad for q in params.values()]
        if world > 1 and grads:
            flat = flatten(grads)
            dist.all_reduce(flat, group=self.group)
            offset = 0
            for g in grads:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
        with torch.no_grad():
            for g in grads:
                g.div_(n)
        return {name: q.grad for name, q in params.items()}


def merge_result(
    result: PerExampleResult, sums: Tensor | None = None, group: dist.ProcessGroup | None = None
) -> StepResult:
    """Merge one optimizer step whose backward passes a framework ran (Lightning, the Hugging
    Face Trainer) and whose gradient it already averaged over the workers.

    Collective: every rank of the group must call it, with ``sums`` of the same length. The
    per-example sums (and ``sums``) are added over workers in ONE ``all_reduce`` of a flat
    float64 vector, as :meth:`DistributedPerExample.step` does; the gradient is not reduced
    again: ``result.batch_grads`` (``.grad`` unscaled, which DistributedDataParallel has
    averaged over the workers' equal-sized batches) is taken as the global mean gradient ḡ.

    Args:
        result: this worker's ``pe.result(reduction="mean", ...)`` over its micro-batches of the
            step (``PerExample(model, second_moment=True)`` for the SNR).
        sums: (k,) numbers of your own to add over workers in the same ``all_reduce``, or None.
        group: the process group (default: the world; one process without one).

    Every worker must hold as many examples of the step: ``.grad`` is then the mean of the
    workers' mean gradients, which is the global batch's, and under FSDP2 each rank's second
    moments, reduce-scattered as each backward ends, carry the one scale (its batch size) that
    ``result`` applies after the merge. The sizes are checked in the same ``all_reduce`` (Σ_w n_w²
    against (Σ_w n_w)² / W).

    Returns:
        A :class:`StepResult` over the B examples of all workers; ``micro_batches`` is 0 (the
        micro-batch gradients were not seen apart, so there is no two-batch estimate).

    Raises:
        ValueError: ``result`` is not of ``reduction="mean"`` (a framework's mean loss); the
            workers' batches of this step differ in size (raised on every rank).
    """
    if result.reduction != "mean":
        raise ValueError(
            f"merge_result needs a result of reduction='mean' (the framework's mean loss), got {result.reduction!r}: "
            "read it with pe.result(reduction='mean')."
        )
    names = tuple(result.param_sq_norms)
    per_param = [result.param_sq_norms[name].sum() for name in names]
    sq_sums = torch.stack([result.sq_norms.sum(), *per_param]).detach().to("cpu", torch.float64)
    head = torch.tensor([result.n, 0.0, 0.0, 0.0], dtype=torch.float64)
    params = {name: result.batch_grads[name] for name in names}
    mine = torch.zeros(0, dtype=torch.float64) if sums is None else sums.detach().reshape(-1).to("cpu", torch.float64)
    extra = torch.cat([mine, torch.tensor([float(result.n) ** 2], dtype=torch.float64)])  # then Σ_w n_w²
    second = result.second_moment
    if any(is_sharded(g) for g in params.values()):  # FSDP2: second moments reduce-scattered already
        merged = _merge_sums(head, sq_sums, extra, None, params, group)
        step = _sharded_step_result(merged, {name: g.detach() for name, g in params.items()}, second)
    else:
        if second is not None:
            second = {name: second[name].detach().to("cpu", torch.float64) for name in names}
        merged = _merge_sums(head, sq_sums, extra, second, params, group)
        step = merged.step_result({name: g.detach() for name, g in params.items()})
    _check_equal_batches(step.n, float(step.sums[-1]), _world(group))
    return replace(step, sums=step.sums[:-1])


def _check_equal_batches(total: int, sq_sizes: float, world: int) -> None:
    """Raise unless the W workers' batch sizes n_w, with Σ n_w = ``total`` and Σ n_w² = ``sq_sizes``,
    are all equal (W Σ n_w² = (Σ n_w)² exactly then, and only then)."""
    if world * sq_sizes == float(total) ** 2:
        return
    raise ValueError(
        f"the {world} workers' batches of this step differ in size ({total} examples in all, not {total / world:g} "
        "each): the framework averages the workers' mean gradients, which is the global batch's mean gradient only "
        "when every worker has as many examples (and, under FSDP2, each rank's second moments are summed over the "
        "ranks before its batch size scales them). Give every worker batches of one size: the frameworks' "
        "distributed samplers pad the data to an equal split, and drop_last=True drops an uneven last batch."
    )


def _sharded_step_result(
    merged: _MergedSums, mean_grads: dict[str, Tensor], second: dict[str, Tensor] | None
) -> StepResult:
    """The :class:`StepResult` of a sharded model: ``mean_grads`` and ``second`` (summed over the
    ranks' examples by reduce-scatters) are DTensors sharded like the parameters; ‖ḡ‖² is summed
    over the ranks' rows in one ``all_reduce``."""
    return replace(merged.step_result(mean_grads, grad_sq=global_sq_norms(mean_grads)), second_moment=second)


@dataclass(frozen=True)
class _MergedSums:
    """The per-example sums of a step added over workers: what both ways of merging share."""

    n: int
    names: tuple[str, ...]
    vector: Tensor  # the reduced flat vector, laid out as _merge_sums writes it
    extra: int
    shapes: dict[str, torch.Size] | None  # of the second moments, when merged

    def step_result(self, mean_grads: dict[str, Tensor], grad_sq: dict[str, Tensor] | None = None) -> StepResult:
        """A :class:`StepResult` with the global mean gradient ``mean_grads`` ({name: p.shape}) and
        its squared norms ``grad_sq`` ({name: 0-dim}; computed from ``mean_grads`` when None)."""
        p, k = len(self.names), self.extra
        v = self.vector
        second = None
        if self.shapes is not None:
            flat, second, offset = v[_SCALARS + 1 + p + k :], {}, 0
            for name, shape in self.shapes.items():
                size = shape.numel()
                second[name] = flat[offset : offset + size].reshape(shape).to(mean_grads[name].device)
                offset += size
        zero = torch.zeros((), dtype=torch.float64)
        if grad_sq is None:
            grad_sq = sq_norms({k: g.detach().double() for k, g in mean_grads.items()}, zero)
        norms = [s.cpu() for s in grad_sq.values()]
        total_and_norms = (
            torch.stack([torch.stack(norms).sum(), *norms]) if norms else torch.zeros(1, dtype=torch.float64)
        )
        return StepResult(
            n=self.n,
            names=self.names,
            sq_norm_sums=v[_SCALARS : _SCALARS + 1 + p],
            grad_sq_norms=total_and_norms,
            mean_grads=mean_grads,
            second_moment=second,
            micro_batches=int(v[1]),
            micro_sq_norm_sum=float(v[2]),
            micro_inv_size_sum=float(v[3]),
            sums=v[_SCALARS + 1 + p : _SCALARS + 1 + p + k],
        )


def _merge_sums(
    head: Tensor,
    sq_sums: Tensor,
    sums: Tensor | None,
    second: dict[str, Tensor] | None,
    params: dict[str, Tensor],
    group: dist.ProcessGroup | None,
) -> _MergedSums:
    """Add a step's sums over the workers in ONE ``all_reduce`` of a flat float64 vector:
    ``head`` (_SCALARS,) = (n, M, Σₘ ‖ḡₘ‖², Σₘ 1/bₘ), ``sq_sums`` (1+P,), the caller's ``sums``
    (k,), then the second moments {name: p.shape} flattened in ``params`` order."""
    extra = torch.zeros(0) if sums is None else sums.detach().reshape(-1)
    extra = extra.to("cpu", torch.float64)
    parts = [head, sq_sums, extra]
    if second is not None:
        parts += [second[name].reshape(-1).cpu() for name in params]
    merged = torch.cat(parts)
    if _world(group) > 1:
        merged = _on_backend_device(merged, group)
        dist.all_reduce(merged, group=group)
        merged = merged.cpu()
    shapes = None if second is None else {name: q.shape for name, q in params.items()}
    return _MergedSums(int(merged[0]), tuple(params), merged, extra.numel(), shapes)


def rank_and_world(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """(this process's rank, number of workers); (0, 1) without an initialised process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _world(group: dist.ProcessGroup | None) -> int:
    return rank_and_world(group)[1]


def _on_backend_device(t: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """``t`` where the group's backend can reduce it: the current CUDA device for NCCL."""
    if dist.get_backend(group) == "nccl":
        return t.to(torch.device("cuda", torch.cuda.current_device()))
    return t


def shutdown() -> None:
    """Leave the process group: free what still refers to it, then destroy it.

    DDP wrappers and hooked models of finished runs can sit in reference cycles that still hold
    the process group; collected only at interpreter exit, after the group is gone, their gloo
    work aborts the process ("terminate called without an active exception"). So every rank
    waits for the others first, then collects them, then destroys the group.
    """
    dist.barrier()  # no rank tears its connections down while another still uses them
    gc.collect()
    dist.destroy_process_group()


def init_from_env() -> torch.device:
    """Join the process group that ``torchrun`` describes in the environment.

    Gloo on CPU, NCCL (one GPU per local rank) when CUDA is available.

    Returns:
        The device this worker computes on.
    """
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
        return device
    dist.init_process_group("gloo")
    return torch.device("cpu")


def broadcast_object(obj, src: int = 0, group: dist.ProcessGroup | None = None):
    """``obj`` from rank ``src`` on every rank (picklable objects); ``obj`` itself in one process."""
    if _world(group) == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def all_gather_cat(t: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """(Σ_r n_r, ...) every rank's ``t`` of shape (n_r, ...) concatenated in rank order (on CPU)."""
    if _world(group) == 1:
        return t.detach().cpu()
    parts = [None] * _world(group)
    dist.all_gather_object(parts, t.detach().cpu(), group=group)
    return torch.cat(parts)


def check_same_settings(settings: dict, group: dist.ProcessGroup | None = None) -> None:
    """Stop every rank when the ranks were started with different settings.

    Raises:
        ValueError: naming the first setting that differs, with its value on rank 0 and on the
            first rank that differs (raised on every rank).
    """
    world = _world(group)
    if world == 1:
        return
    gathered = [None] * world
    dist.all_gather_object(gathered, settings, group=group)
    first = gathered[0]
    for rank, other in enumerate(gathered[1:], start=1):
        for key in sorted(set(first) | set(other)):
            if first.get(key) != other.get(key):
                raise ValueError(
                    f"the workers were started with different settings: {key} is {first.get(key)!r} on rank 0 "
                    f"but {other.get(key)!r} on rank {rank}. Start every worker with the same flags and config file."
                )


@contextlib.contextmanager
def no_sync(model: nn.Module):
    """``model.no_sync()`` for a DistributedDataParallel model; nothing for any other model."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    else:
        yield
