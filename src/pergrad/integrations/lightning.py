"""``PergradCallback``: pergrad's statistics in a Lightning ``Trainer``, on an unmodified module.

The callback attaches :class:`~pergrad.PerExample` to the ``LightningModule`` at the start of
fitting. Lightning runs ``training_step`` and the backward of its scalar mean loss (divided by
``accumulate_grad_batches``); the hooks measure each backward, and in
``on_before_optimizer_step`` (after the last micro-batch, after ``GradScaler.unscale_`` under
``precision="16-mixed"``, before gradient clipping) the callback reads the step's gathered
result with ``reduction="mean"``: the micro-batches' losses add up to the mean over the step's
examples. Under the DDP strategy each worker reads its own examples, ``.grad`` holds the
global mean gradient, and the statistics are merged with one ``all_reduce``.

Logged with ``pl_module.log`` at every optimizer step (so they reach
``trainer.callback_metrics`` and every logger): ``pergrad/b_simple`` (with
``pergrad/b_simple_low`` and ``_high``, its 95% interval), ``pergrad/trace_sigma``,
``pergrad/grad_sq_norm``, ``pergrad/norm_q10``, ``_q50``, ``_q90``, ``_max`` (per-example
gradient norms of the step's global batch) and ``pergrad/snr/<parameter>``; under Adam or AdamW
also ``pergrad/b_precond`` (with ``_low``, ``_high``), the noise scale B_P in Adam's metric.

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
from ._step import RunDirectory, StepStatistics

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
            steps), False (none). See :class:`pergrad.verify.Schedule`.

    Attributes:
        statistics: the :class:`~pergrad.integrations._step.StepStatistics` kept so far.
    """

    def __init__(self, beta: float = 0.95, *, run_dir: str | Path | None = None, log_every: int = 1,
                 on_unsupported: str = "auto", verify: bool | str | int = "first"):  # fmt: skip
        if log_every < 1:
            raise ValueError(f"log_every must be at least 1, got {log_every}.")
        self.beta = beta
        self.run_dir = run_dir
        self.log_every = log_every
        self.on_unsupported = on_unsupported
        self.schedule = Schedule(verify)
        self._check: StepCheck | None = None  # of the step in progress
        self.statistics = StepStatistics(beta)
        self._pe: PerExample | None = None
        self._run: RunDirectory | None = None
        self._losses = torch.zeros(2, dtype=torch.float64)  # this step's loss, 1
        self._window = torch.zeros(2, dtype=torch.float64)  # Σ over workers and steps since the last row

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._pe = PerExample(pl_module, second_moment=True, on_unsupported=self.on_unsupported, verify=False)
        if self.run_dir is not None and trainer.is_global_zero:
            self._run = RunDirectory(self.run_dir, {
                "framework": "lightning", "beta": self.beta, "log_every": self.log_every,
                "accumulate": trainer.accumulate_grad_batches, "workers": trainer.world_size,
                "precision": str(trainer.precision),
            })  # fmt: skip

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
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
        # under 16-mixed Lightning has unscaled .grad before this hook: grad_scale 1
        result = self._pe.result("mean", loss_scale=_loss_scale(trainer), grad_scale=1.0)
        check, self._check = self._check, None
        if check is not None:
            check.finish(result, lambda batch: _single_loss(trainer, pl_module, batch))
        self._losses[1] = 1.0  # one step of this worker
        self.statistics.follow_optimizer(optimizer, pl_module)
        step = self.statistics.update(result, sums=self._losses)
        self._losses.zero_()
        self._window += step.sums
        pl_module.log_dict(self.statistics.metrics(), on_step=True, on_epoch=False)
        if self._run is not None and self.statistics.steps % self.log_every == 0:
            self._append_row(trainer, optimizer, step.n)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.teardown_hooks()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.teardown_hooks()

    def teardown_hooks(self) -> None:
        """Remove pergrad's hooks from the module (done at the end of fitting)."""
        if self._check is not None:
            self._check.cancel()
            self._check = None
        if self._pe is not None:
            self._pe.remove()
            self._pe = None

    def _append_row(self, trainer: pl.Trainer, optimizer, batch_size: int) -> None:
        """A row of ``metrics.csv``: the mean loss of the steps since the last row, over the
        workers, and the statistics now."""
        step = self.statistics.steps
        loss_sum, count = self._window.tolist()
        self._window.zero_()
        self._run.append({
            Column.STEP: step,
            Column.EPOCH: trainer.current_epoch,
            Column.EXAMPLES: step * batch_size,
            Column.LR: float(optimizer.param_groups[0]["lr"]),
            Column.BATCH_SIZE: batch_size,
            Column.LOSS: loss_sum / count if count else None,
            **self.statistics.values(),
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
