"""``PergradCallback``: pergrad's statistics in a Lightning ``Trainer``, on an unmodified module.

The callback attaches :class:`~pergrad.PerExample` to the ``LightningModule`` at the start of
fitting. Lightning runs ``training_step`` and the backward of its scalar mean loss (divided by
``accumulate_grad_batches``); the hooks measure each backward, and in
``on_before_optimizer_step`` (after the last micro-batch, after ``GradScaler.unscale_`` under
``precision="16-mixed"``, before gradient clipping) the callback reads the step's gathered
result with ``reduction="mean"``: the micro-batches' losses add up to the mean over the step's
examples. Under the DDP strategy each worker reads its own examples, ``.grad`` holds the
global mean gradient, and the statistics are merged with one ``all_reduce``.

Logged with ``pl_module.log`` at every measured optimizer step (so they reach
``trainer.callback_metrics`` and every logger): ``pergrad/b_simple`` (with
``pergrad/b_simple_low`` and ``_high``, its 95% interval), ``pergrad/trace_sigma``,
``pergrad/grad_sq_norm``, ``pergrad/norm_q10``, ``_q50``, ``_q90``, ``_max`` (per-example
gradient norms of the step's global batch) and ``pergrad/snr/<parameter>``; under Adam or AdamW
also ``pergrad/b_precond`` (with ``_low``, ``_high``), the noise scale B_P in Adam's metric.

With ``measure_every=k`` only optimizer steps 0, k, 2k, … (Lightning's ``global_step``) are
measured; the others run inside :meth:`PerExample.paused <pergrad.PerExample.paused>` (the hooks
capture nothing: about the cost of a plain step) and log no ``pergrad/`` metric. The smoothing's
β applies per measured step. Rows of ``metrics.csv`` keep their ``log_every`` steps and their loss;
a row with no measured step since the previous one leaves the statistics empty.

The first measured step is checked before anything is logged (``verify``): examples 0 and n−1
of the step's batch are run alone through ``training_step`` (with ``self.log`` silenced, under
the trainer's precision context), their gradients taken by autograd, and compared per parameter
with the step's per-example results, up to one positive factor per example (a
``training_step`` may average over tokens, or micro-batches may differ in size: a scale pergrad
cannot know), while the pieces of the step's backward passes must add up exactly to the
gradients those passes computed. A mismatch raises :class:`~pergrad.errors.VerificationError`
and stops the fit. The check step runs with dropout off (see :class:`pergrad.verify.StepCheck`),
calls ``training_step`` twice more (its side effects other than logging happen again), and needs
every tensor of the batch to hold the step's examples along its first axis; else pass
``verify=False``.

Example::

    trainer = lightning.Trainer(max_epochs=3, callbacks=[PergradCallback(run_dir="runs/lit")])
    trainer.fit(module, loader)
    trainer.callback_metrics["pergrad/b_simple"]
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch

from ..per_example import PerExample
from ..train.metrics import Column
from ..verify import Schedule, StepCheck
from ._step import Measuring, RunDirectory, StepStatistics, add_over_workers

__all__ = ["PergradCallback"]


class PergradCallback(pl.Callback):
    """Per-example gradient statistics of every optimizer step, logged through ``pl_module.log``.

    Args:
        beta: smoothing factor in (0, 1] of the noise scale and SNR over steps.
        run_dir: also write ``config.toml`` and ``metrics.csv`` there (rank 0, one row every
            ``log_every`` steps) for ``pergrad report RUN_DIR``; None for none.
        log_every: optimizer steps between rows of ``run_dir``'s ``metrics.csv``.
        on_unsupported: as for :class:`~pergrad.PerExample`.
        verify: which optimizer steps are checked against autograd on single examples before
            their statistics are logged: "first" (default, examples 0 and n−1 of the first
            step), True (every step), an int k (the first step, then one example every k
            steps), False (none). See :class:`pergrad.verify.Schedule`. Steps count measured steps.
        measure_every: measure one optimizer step in k (steps 0, k, 2k, … of ``trainer.global_step``),
            the others paused (see the module); 1 (default): every step.

    Attributes:
        statistics: the :class:`~pergrad.integrations._step.StepStatistics` kept so far.
    """

    def __init__(self, beta: float = 0.95, *, run_dir: str | Path | None = None, log_every: int = 1,
                 on_unsupported: str = "auto", verify: bool | str | int = "first", measure_every: int = 1):  # fmt: skip
        if log_every < 1:
            raise ValueError(f"log_every must be at least 1, got {log_every}.")
        self.measuring = Measuring(measure_every)
        self.beta = beta
        self.run_dir = run_dir
        self.log_every = log_every
        self.on_unsupported = on_unsupported
        self.schedule = Schedule(verify)
        self._check: StepCheck | None = None  # of the step in progress
        self.statistics = StepStatistics(beta)
        self._pe: PerExample | None = None
        self._run: RunDirectory | None = None
        self._losses = torch.zeros(2, dtype=torch.float64)  # this worker's Σ loss, steps, not yet merged
        self._window = torch.zeros(2, dtype=torch.float64)  # Σ over workers and steps since the last row
        self._batch_size = 0  # of the last measured step, over all workers

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._pe = PerExample(pl_module, second_moment=True, on_unsupported=self.on_unsupported, verify=False)
        if self.run_dir is not None and trainer.is_global_zero:
            self._run = RunDirectory(self.run_dir, {
                "framework": "lightning", "beta": self.beta, "log_every": self.log_every,
                "measure_every": self.measuring.every,
                "accumulate": trainer.accumulate_grad_batches, "workers": trainer.world_size,
                "precision": str(trainer.precision),
            })  # fmt: skip

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if not self.measuring.begin_step(trainer.global_step, self._pe):
            return
        step = self.statistics.steps
        if self._check is None and self.schedule.due(step):
            self._check = StepCheck(self._pe, pl_module, lambda n: self.schedule.examples(step, n))
        if self._check is not None:
            self._check.dropout_off()
            self._check.add(batch)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        # the micro-batch's mean loss / accumulate_grad_batches (times the GradScaler's scale)
        self._losses += torch.tensor([float(loss.detach()) / _loss_scale(trainer), 0.0], dtype=torch.float64)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        self._losses[1] += 1.0  # one step of this worker
        if self.measuring.measured:
            self._measure(trainer, pl_module, optimizer)
        steps = trainer.global_step + 1  # optimizer steps done once this one is
        if self.run_dir is not None and steps % self.log_every == 0:
            if self._losses[1] > 0:  # unmeasured steps since the last merge: their losses, over the workers
                self._window += add_over_workers(self._losses)
                self._losses.zero_()
            if self._run is not None:
                self._append_row(trainer, optimizer, steps)

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        """Read the step's gathered result, check it if due, merge it over the workers and log it."""
        # under 16-mixed Lightning has unscaled .grad before this hook: grad_scale 1
        result = self._pe.result("mean", loss_scale=_loss_scale(trainer), grad_scale=1.0)
        check, self._check = self._check, None
        if check is not None:
            check.finish(result, lambda batch: _single_loss(trainer, pl_module, batch))
        self.statistics.follow_optimizer(optimizer, pl_module)
        step = self.statistics.update(result, sums=self._losses)
        self._losses.zero_()
        self._window += step.sums
        self._batch_size = step.n
        pl_module.log_dict(self.statistics.metrics(), on_step=True, on_epoch=False)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.teardown_hooks()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.teardown_hooks()

    def teardown_hooks(self) -> None:
        """Remove pergrad's hooks from the module (done at the end of fitting)."""
        if self._check is not None:
            self._check.cancel()
            self._check = None
        self.measuring.end()
        if self._pe is not None:
            self._pe.remove()
            self._pe = None

    def _append_row(self, trainer: pl.Trainer, optimizer, step: int) -> None:
        """A row of ``metrics.csv`` after ``step`` optimizer steps: the mean loss of the steps since
        the last row, over the workers, and the statistics now (empty if none was measured since)."""
        loss_sum, count = self._window.tolist()
        self._window.zero_()
        batch_size = self._batch_size
        self._run.append({
            Column.STEP: step,
            Column.EPOCH: trainer.current_epoch,
            Column.EXAMPLES: step * batch_size,
            Column.LR: float(optimizer.param_groups[0]["lr"]),
            Column.BATCH_SIZE: batch_size,
            Column.LOSS: loss_sum / count if count else None,
            **self.statistics.row_values(),
        })  # fmt: skip


def _single_loss(trainer: pl.Trainer, pl_module: pl.LightningModule, batch) -> torch.Tensor:
    """``training_step``'s loss on a batch of one example, under the trainer's precision context,
    with ``self.log`` and ``self.log_dict`` silenced."""

    def silent(*args, **kwargs) -> None:
        return None

    pl_module.__dict__.update(log=silent, log_dict=silent)
    try:
        with trainer.precision_plugin.train_step_context():
            out = pl_module.training_step(batch, 0)
    finally:
        del pl_module.__dict__["log"], pl_module.__dict__["log_dict"]
    loss = out.get("loss") if isinstance(out, dict) else out
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise ValueError(
            f"training_step returned {type(out).__name__} on one example, not a loss (a 0-dim tensor, or a dict "
            "with 'loss'): the check against single examples needs it. Pass verify=False to PergradCallback."
        )
    return loss


def _loss_scale(trainer: pl.Trainer) -> float:
    """The GradScaler's scale under ``precision="16-mixed"``, else 1."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
