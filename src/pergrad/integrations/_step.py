"""What both callbacks keep over training: the step statistics, their metric names, a run directory.

Per measured optimizer step (every step, or one in ``measure_every``), :meth:`StepStatistics.update`
merges the workers' gathered per-example results (:func:`pergrad.distributed.merge_result`), feeds
the global batch's tr Σ̂ and |G|²̂ to a :class:`~pergrad.NoiseScale` and its second moments to a
:class:`~pergrad.ParamSNR` (both smoothed with weights β^(t−b), b and t counted in measured steps),
and keeps the global batch's per-example norms. Under Adam or AdamW
(:meth:`StepStatistics.follow_optimizer`) a second :class:`~pergrad.NoiseScale` keeps
B_P = tr(PΣ)/GᵀPG in Adam's metric, logged as ``pergrad/b_precond``.
:meth:`StepStatistics.metrics` names them as the trainer's ``metrics.csv`` does
(:class:`pergrad.train.metrics.Column`), behind the ``pergrad/`` prefix.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.distributed as dist

from .. import distributed
from .._atomic import write_atomic
from ..distributed import StepResult, merge_result
from ..per_example import PerExample, PerExampleResult
from ..sharded import is_sharded, local, sum_over_ranks
from ..stats import NoiseScale, ParamSNR, SNRState, adam_preconditioner, norm_quantiles
from ..stats.batch import per_example_estimate, weighted_sq_norms
from ..stats.smoothing import check_measure_every, is_measured
from ..train.config import _toml_value
from ..train.metrics import Column, MetricsLog

__all__ = ["PREFIX", "Measuring", "RunDirectory", "StepStatistics", "add_over_workers"]

PREFIX = "pergrad/"


class StepStatistics:
    """Smoothed B_simple, tr Σ, |G|² and per-parameter SNR over steps; the last step's norms.

    Args:
        beta: smoothing factor in (0, 1] of the noise scale and the SNR (see
            :class:`~pergrad.NoiseScale`).
        group: the process group the framework trains on (default: the world, or one process).
    """

    def __init__(self, beta: float, group: dist.ProcessGroup | None = None):
        self.noise = NoiseScale(beta=beta)
        self.precond: NoiseScale | None = None  # B_P, once follow_optimizer found Adam
        self.snr = ParamSNR(beta=beta)
        self.group = group
        self.norms = torch.zeros(0, dtype=torch.float64)
        self.steps = 0  # measured steps added
        self._unread = 0  # measured steps added since the last row_values()
        self._sharded_snr: dict[str, float] | None = None  # the layer SNRs of a sharded model's steps

    def update(self, result: PerExampleResult, sums: torch.Tensor | None = None) -> StepResult:
        """:meth:`merge` one optimizer step, then :meth:`add` it."""
        step = self.merge(result, sums)
        self.add(step)
        return step

    def merge(self, result: PerExampleResult, sums: torch.Tensor | None = None) -> StepResult:
        """Merge one optimizer step over the workers (collective: every rank calls it) and keep
        the per-example norms of its global batch.

        Args:
            result: this worker's ``pe.result(reduction="mean", ...)``, with second moments.
            sums: (k,) numbers of the caller's to add over workers in the same ``all_reduce``.

        Returns:
            The merged :class:`~pergrad.distributed.StepResult`.
        """
        step = merge_result(result, sums, self.group)
        self.norms = distributed.all_gather_cat(result.sq_norms.detach().double(), self.group).sqrt()
        return step

    def follow_optimizer(self, optimizer, model: torch.nn.Module) -> None:
        """Also keep B_P when ``optimizer`` (or the optimizer a framework's wrapper holds as
        ``.optimizer``) is Adam or AdamW; ``model`` names the parameters. Once: later calls do nothing."""
        while self.precond is None and not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            optimizer = getattr(optimizer, "optimizer", None)
            if optimizer is None:
                return
        if self.precond is None:
            self.precond = NoiseScale(beta=self.noise.beta, preconditioner=adam_preconditioner(optimizer, model))

    def add(self, step: StepResult) -> None:
        """Add a merged step to the smoothed statistics (before the optimizer's step: Adam's P is
        then independent of the batch); a step of fewer than 2 examples in all (no variance)
        leaves them as they were."""
        if step.n >= 2:
            self.noise.update_estimate(step.estimate(), step.names)
            sharded = next((g for g in step.mean_grads.values() if is_sharded(g)), None)
            weights = None if self.precond is None else self.precond.preconditioner()
            if weights is not None:
                self.precond.update_estimate(_preconditioned_estimate(step, weights, sharded), step.names)
            if sharded is None:
                self.snr.update_sums(step.second_moment, step.mean_grads, step.n)
            else:  # FSDP2: the SNR's sums kept in this rank's rows; its layer sums added over the ranks now
                second = {k: local(v) for k, v in step.second_moment.items()}
                self.snr.update_sums(second, {k: local(g) for k, g in step.mean_grads.items()}, step.n)
                self._sharded_snr = _layer_snr_over_ranks(self.snr.state, sharded)
        self.steps += 1
        self._unread += 1

    def row_values(self) -> dict[str, float | None]:
        """:meth:`values` for a row of ``metrics.csv`` if a step was measured since the previous
        row, else {} (with ``measure_every``, a row between measurements leaves them empty)."""
        fresh, self._unread = self._unread > 0, 0
        return self.values() if fresh else {}

    def values(self) -> dict[str, float | None]:
        """{:class:`Column` name: value} of the statistics now: smoothed B_simple with its 95%
        interval, tr Σ, |G|², the last step's per-example norm quantiles and maximum, and the
        SNR of each parameter; None where not known yet (NaN), +inf kept."""
        e = self.noise.estimate(0.95)
        row = {
            Column.B_SIMPLE: e.b_simple,
            Column.B_SIMPLE_LOW: e.lower,
            Column.B_SIMPLE_HIGH: e.upper,
            Column.TRACE_SIGMA: e.trace_sigma,
            Column.GRAD_SQ_NORM: e.grad_sq_norm,
        }
        if self.precond is not None:
            p = self.precond.estimate(0.95)
            row.update({Column.B_PRECOND: p.b_simple, Column.B_PRECOND_LOW: p.lower, Column.B_PRECOND_HIGH: p.upper})
        if self.norms.numel():
            quantiles = norm_quantiles(self.norms, [q for _, q in Column.NORM_QUANTILES])
            row.update(
                {Column.norm(label): float(v) for (label, _), v in zip(Column.NORM_QUANTILES, quantiles, strict=True)}
            )
            row[Column.NORM_MAX] = float(self.norms.max())
        snr = self.snr.layer_snr() if self._sharded_snr is None else self._sharded_snr
        row.update({Column.snr(name): v for name, v in snr.items()})
        return {k: None if math.isnan(float(v)) else float(v) for k, v in row.items()}

    def metrics(self) -> dict[str, float]:
        """:meth:`values` named ``pergrad/<column>`` for a framework's loggers, without the unknown ones."""
        return {PREFIX + k: v for k, v in self.values().items() if v is not None}


def _preconditioned_estimate(step: StepResult, weights: Mapping[str, torch.Tensor], like: torch.Tensor | None):
    """``step.estimate(preconditioner=weights)``; for a sharded model (``like`` one of its DTensors),
    from each rank's rows of the second moments, mean gradient and P (Adam's state is sharded like
    the parameters), the weighted sums added over the ranks in one ``all_reduce`` (collective)."""
    if like is None:
        return step.estimate(preconditioner=weights)
    rows = {k: local(w) for k, w in weights.items()}
    second = {k: local(m) for k, m in step.second_moment.items()}
    mean_sq, batch_sq = weighted_sq_norms(second, {k: local(g) for k, g in step.mean_grads.items()}, step.n, rows)
    total = sum_over_ranks(torch.stack([mean_sq.cpu(), batch_sq.cpu()]), like)
    return per_example_estimate(total[0], total[1], step.n)


def _layer_snr_over_ranks(state: SNRState, like: torch.Tensor) -> dict[str, float]:
    """{name: |G_p|² / tr Σ_p} of an SNR state whose elementwise sums are this rank's rows of each
    parameter: the sums over the rows added over the ranks of ``like``'s mesh in one ``all_reduce``
    (collective), so that :meth:`StepStatistics.values` needs no collective (rank 0 alone writes rows)."""
    names = list(state.signal)
    sums = torch.stack([torch.stack([state.signal[k].sum(), state.noise[k].sum()]) for k in names])  # (P, 2)
    total = sum_over_ranks(sums, like)
    whole = SNRState({k: total[i, 0] for i, k in enumerate(names)}, {k: total[i, 1] for i, k in enumerate(names)})
    return {name: e.snr for name, e in whole.finalize().items()}


def add_over_workers(sums: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """(k,) float64 ``sums`` added over the workers (one ``all_reduce``; collective), or themselves
    in one process: a row's losses of steps that merged no statistics."""
    sums = sums.detach().to(torch.float64)
    if distributed.rank_and_world(group)[1] == 1:
        return sums.clone()
    nccl = dist.get_backend(group) == "nccl"
    merged = sums.to(torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu"))
    dist.all_reduce(merged, group=group)
    return merged.cpu()


class Measuring:
    """Which optimizer steps a callback measures (``measure_every`` = k: steps 0, k, 2k, …) and the
    :meth:`PerExample.paused <pergrad.PerExample.paused>` block the others run in.

    Args:
        every: k ≥ 1.
    """

    def __init__(self, every: int):
        self.every = check_measure_every(every)
        self.measured = True  # the step in progress
        self._pause: contextlib.ExitStack | None = None

    def begin_step(self, step: int, pe: PerExample) -> bool:
        """At the start of optimizer step ``step`` (0 for the first), before its first forward: pause
        ``pe`` for an unmeasured step (staying paused across consecutive ones), resume it for a
        measured one; return whether it is measured."""
        self.measured = is_measured(step, self.every)
        if self.measured and self._pause is not None:
            self.end()
        elif not self.measured and self._pause is None:
            self._pause = contextlib.ExitStack()
            self._pause.enter_context(pe.paused())
        return self.measured

    def end(self) -> None:
        """Leave the paused block, if any (at a measured step, and before the hooks are removed)."""
        if self._pause is not None:
            self._pause.close()
            self._pause = None


class RunDirectory:
    """A run directory that ``pergrad report DIR`` reads: ``config.toml`` and ``metrics.csv``.

    ``config.toml`` holds what the callback knows of the run (framework, batch size, β...);
    ``metrics.csv`` one row per logged step with the trainer's columns (:class:`Column`). Both
    are written atomically, the metrics at every row.

    Args:
        path: the directory (created).
        settings: {key: str, int or float} written to ``config.toml`` (as the trainer writes its own).
    """

    def __init__(self, path: str | Path, settings: dict):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        lines = [f"{k} = {_toml_value(v)}" for k, v in settings.items()]
        write_atomic(self.path / "config.toml", "\n".join(lines) + "\n")
        self.log = MetricsLog(self.path / "metrics.csv")

    def append(self, row: dict) -> None:
        """Add one row ({:class:`Column` name: value}) and rewrite ``metrics.csv``."""
        self.log.append(row)
