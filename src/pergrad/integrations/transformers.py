"""``PergradCallback``: pergrad's statistics in a stock Hugging Face ``Trainer``.

The callback attaches :class:`~pergrad.PerExample` to the model when training begins. The
Trainer backpropagates each micro-batch's loss (divided by ``gradient_accumulation_steps``, or,
for models that take ``num_items_in_batch`` such as causal LMs, the token-summed loss over the
step's token count); the hooks measure each backward, and before the optimizer step the
callback reads the step's result with ``reduction="mean"``.

What "per-example" means for a token-averaged loss: the step's loss is Σⱼ tⱼ / N_tokens, tⱼ
example j's summed token loss, so with ``reduction="mean"`` example j's own loss is
ℓⱼ = B · tⱼ / N_tokens: its summed token loss on the scale of the batch's mean token loss.
The gradients ∇ℓⱼ average exactly to the gradient the optimizer gets.

Gradient clipping (``max_grad_norm``, on by default) runs before any callback sees ``.grad``.
The callback therefore also sums each parameter's gradient of every backward of the step
(ḡ_w on worker w, before clipping and before DDP averages it), and recovers the clipping factor
c from ``.grad`` = c·ḡ: c = ‖.grad‖² / ⟨.grad, ḡ⟩ with ⟨.grad, ḡ⟩ = (1/W) Σ_w ⟨.grad, ḡ_w⟩ added
over the W workers in the statistics' one ``all_reduce``. Under FSDP2 (a model whose parameters are
DTensors, as ``from_pretrained(..., distributed_config=DistributedConfig(fsdp_size=W))`` loads it)
no gradient hook sees a sharded parameter's gradient; instead, as each backward pass ends (after
FSDP2's reduce-scatter), the callback copies this rank's rows of ``.grad``: after the step's last
micro-batch they are the rows of ḡ before clipping, and ⟨.grad, ḡ⟩ is the sum over the ranks' rows.

The first step is checked before anything is logged (``verify``): the callback records the
model's inputs of the step's forwards (a forward pre-hook), runs the model on examples 0 and
n−1 of them alone (``num_items_in_batch`` left out, so the model's loss averages over that
example's tokens), takes autograd's gradient of the returned ``loss`` and compares it per
parameter with the step's per-example results up to one positive factor per example (example
j's loss here is its summed token loss over the step's token count: a scale pergrad cannot
know), while the pieces of the step's backward passes must add up exactly to the gradients those
passes computed (recorded before clipping). A mismatch raises
:class:`~pergrad.errors.VerificationError` and stops training. The checked step runs with
dropout off (see :class:`pergrad.verify.StepCheck`). The reference is the model's own loss
(``outputs.loss``) on the step's inputs: a Trainer whose ``compute_loss`` computes another loss
needs ``verify=False``, as does a batch with a tensor that does not hold the step's examples
along its first axis.

With ``measure_every=k`` only optimizer steps 0, k, 2k, … (``state.global_step``) are measured; the
others run inside :meth:`PerExample.paused <pergrad.PerExample.paused>` (no capture, no check, no
summed gradients for the clipping factor). The smoothing's β applies per measured step. A training
log gets the ``pergrad/`` metrics only if a step was measured since the previous log, and so does a
row of ``metrics.csv`` (else its statistics are empty; the loss is there).

The metrics (``pergrad/b_simple`` and the others of :mod:`pergrad.integrations.lightning`) are
added to every training log, so they reach ``trainer.state.log_history`` and the ``report_to``
integrations: add the callback with :meth:`PergradCallback.attach`, which puts it before them.

Example::

    trainer = Trainer(model=model, args=args, train_dataset=data)
    PergradCallback.attach(trainer, run_dir="runs/hf")
    trainer.train()
    trainer.state.log_history[-1]["pergrad/b_simple"]
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from transformers import TrainerCallback

from .._tensors import adder
from ..distributed import StepResult
from ..per_example import PerExample
from ..sharded import is_sharded, local
from ..train.metrics import Column
from ..verify import Schedule, StepCheck
from ._step import PREFIX, Measuring, RunDirectory, StepStatistics

__all__ = ["PergradCallback"]


class PergradCallback(TrainerCallback):
    """Per-example gradient statistics of every optimizer step, added to the Trainer's logs.

    Args:
        beta: smoothing factor in (0, 1] of the noise scale and SNR over steps.
        run_dir: also write ``config.toml`` and ``metrics.csv`` there (main process, a row at
            every training log) for ``pergrad report RUN_DIR``; None for none.
        on_unsupported: as for :class:`~pergrad.PerExample`.
        verify: which optimizer steps are checked against autograd on single examples before
            their statistics are added: "first" (default, examples 0 and n−1 of the first
            step), True (every step), an int k (the first step, then one example every k
            steps), False (none). See :class:`pergrad.verify.Schedule`. Steps count measured steps.
        measure_every: measure one optimizer step in k (steps 0, k, 2k, … of ``state.global_step``),
            the others paused (see the module); 1 (default): every step.

    Attributes:
        statistics: the :class:`~pergrad.integrations._step.StepStatistics` kept so far.
    """

    def __init__(self, beta: float = 0.95, *, run_dir: str | Path | None = None, on_unsupported: str = "auto",
                 verify: bool | str | int = "first", measure_every: int = 1):  # fmt: skip
        self.measuring = Measuring(measure_every)
        self.beta = beta
        self.schedule = Schedule(verify)
        self._check: StepCheck | None = None  # of the step in progress
        self._model: nn.Module | None = None
        self.run_dir = run_dir
        self.on_unsupported = on_unsupported
        self.statistics = StepStatistics(beta)
        self._pe: PerExample | None = None
        self._run: RunDirectory | None = None
        self._summed: dict[str, torch.Tensor] = {}  # ḡ_w × loss scale, while clipping is on
        self._sharded = False  # FSDP2: self._summed holds this rank's rows of ḡ × loss scale instead
        self._snapshot_queued = False
        self._handles: list = []
        self._batch_size = 0

    @classmethod
    def attach(cls, trainer, **options) -> PergradCallback:
        """A new callback (``options`` as for the constructor), placed before ``trainer``'s other
        callbacks so that the ``report_to`` integrations log its metrics too; returns it."""
        callback = cls(**options)
        trainer.callback_handler.callbacks.insert(0, callback)
        return callback

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._pe = PerExample(model, second_moment=True, on_unsupported=self.on_unsupported, verify=False)
        self._model = model
        if self.schedule.verify is not False:
            self._handles.append(model.register_forward_pre_hook(self._record_inputs, with_kwargs=True))
        self._sharded = any(is_sharded(p) for p in model.parameters())
        if args.max_grad_norm and args.max_grad_norm > 0:
            for name, p in model.named_parameters():
                if p.requires_grad:
                    self._summed[name] = torch.zeros_like(local(p), dtype=torch.float64)
                    if not self._sharded:
                        self._handles.append(p.register_hook(self._when_measured(adder(self._summed[name]))))
            if self._sharded:  # after FSDP2's own forward hook, so that its reduce-scatters end first
                self._handles.append(model.register_forward_hook(self._hook_outputs))
        if self.run_dir is not None and state.is_world_process_zero:
            self._run = RunDirectory(self.run_dir, {
                "framework": "transformers", "beta": self.beta, "measure_every": self.measuring.every,
                "accumulate": args.gradient_accumulation_steps, "workers": args.world_size,
                "max_grad_norm": float(args.max_grad_norm or 0.0),
            })  # fmt: skip

    def _when_measured(self, hook):
        """A gradient hook that runs on measured steps only."""

        def gated(grad: torch.Tensor) -> None:
            if self.measuring.measured:
                hook(grad)

        return gated

    def on_step_begin(self, args, state, control, **kwargs):
        if not self.measuring.begin_step(state.global_step, self._pe):
            return
        step = self.statistics.steps
        if self._check is None and self.schedule.due(step):
            self._check = StepCheck(self._pe, self._model, lambda n: self.schedule.examples(step, n))

    def _record_inputs(self, module, args, kwargs):
        """Before each forward of a checked step (after the Trainer's ``model.train()``): dropout
        off, and the inputs kept, without ``num_items_in_batch``."""
        if self._check is not None and torch.is_grad_enabled():
            self._check.dropout_off()
            self._check.add((args, {k: v for k, v in kwargs.items() if k != "num_items_in_batch"}))

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if not self.measuring.measured:
            return
        scaler = getattr(optimizer, "scaler", None)
        loss_scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        # accelerate unscales .grad when the Trainer measures (and clips) its norm, before this
        result = self._pe.result("mean", loss_scale=loss_scale, grad_scale=1.0)
        dot = sum(float((local(result.batch_grads[k]).double() * s).sum()) for k, s in self._summed.items())
        check, self._check = self._check, None
        if check is not None:  # its backward passes add to self._summed, read above
            check.finish(result, self._single_loss)
        if not self._summed:
            step = self.statistics.merge(result)
        else:
            workers = 1 if self._sharded else args.world_size  # sharded: Σ over the ranks' rows is ⟨.grad, ḡ⟩
            step = _unclipped(self.statistics.merge(result, torch.tensor([dot / loss_scale])), workers)
            for s in self._summed.values():
                s.zero_()
        self.statistics.follow_optimizer(optimizer, self._pe.model)
        self.statistics.add(step)
        self._batch_size = step.n

    def _hook_outputs(self, module, args, output) -> None:
        """After each forward of a sharded model with clipping on: at the end of its backward,
        :meth:`_snapshot_grads` (queued by the first output gradient, behind FSDP2's own end of backward,
        which its hooks on the same outputs, registered first, queued before)."""
        if torch.is_grad_enabled() and self.measuring.measured:
            for t in _tensors_in(output):
                if t.requires_grad:
                    t.register_hook(self._queue_snapshot)

    def _queue_snapshot(self, grad: torch.Tensor) -> None:
        if not self._snapshot_queued:
            self._snapshot_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._snapshot_grads)

    def _snapshot_grads(self) -> None:
        """This rank's rows of ``.grad`` as a backward pass ends, FSDP2's reduce-scatter done: after the
        step's last micro-batch, the rows of the mean gradient before the Trainer clips it."""
        self._snapshot_queued = False
        for name, p in self._model.named_parameters():
            if name not in self._summed:
                continue
            if p.grad is None:
                self._summed[name].zero_()
            else:
                self._summed[name].copy_(local(p.grad))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs or self.statistics.steps == 0:
            return  # not a training log
        values = self.statistics.row_values()  # {} when no step was measured since the previous log
        metrics = {PREFIX + k: v for k, v in values.items() if v is not None}
        logs.update(metrics)
        if state.log_history:
            state.log_history[-1].update(metrics)
        if self._run is not None:
            self._run.append({
                Column.STEP: state.global_step,
                Column.EPOCH: int(state.epoch or 0),
                Column.EXAMPLES: state.global_step * self._batch_size,
                Column.LR: logs.get("learning_rate"),
                Column.BATCH_SIZE: self._batch_size,
                Column.LOSS: logs["loss"],
                **values,
            })  # fmt: skip

    def _single_loss(self, inputs) -> torch.Tensor:
        """The model's own loss on one example's inputs (``outputs.loss``)."""
        args, kwargs = inputs
        out = self._model(*args, **kwargs)
        loss = out.get("loss") if isinstance(out, dict) else getattr(out, "loss", None)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise ValueError(
                "the model returned no loss on one example's inputs (its labels are passed elsewhere, as with "
                "compute_loss_func or label smoothing): the check against single examples needs it. Pass "
                "verify=False to PergradCallback."
            )
        return loss

    def on_train_end(self, args, state, control, **kwargs):
        if self._check is not None:
            self._check.cancel()
            self._check = None
        self.measuring.end()
        if self._pe is not None:
            self._pe.remove()
            self._pe = None
        for handle in self._handles:
            handle.remove()
        self._handles, self._summed = [], {}


def _tensors_in(output) -> list[torch.Tensor]:
    """The tensors of a model's output: a tensor, or those in a mapping (a ``ModelOutput``), tuple or list."""
    if isinstance(output, torch.Tensor):
        return [output]
    items = output.values() if isinstance(output, Mapping) else output if isinstance(output, (tuple, list)) else ()
    return [t for item in items for t in _tensors_in(item)]


def _unclipped(step: StepResult, workers: int) -> StepResult:
    """``step`` with the gradient before clipping: ``.grad`` = c·ḡ, c = ‖.grad‖² / ⟨.grad, ḡ⟩, where
    ``step.sums[0]`` = Σ_w ⟨.grad, ḡ_w⟩ over the W workers and ḡ = (1/W) Σ_w ḡ_w."""
    dot = float(step.sums[0]) / workers
    clipped_sq = float(step.grad_sq_norms[0])
    c = clipped_sq / dot if dot > 0 and clipped_sq > 0 else 1.0
    return replace(
        step,
        mean_grads={k: g / c for k, g in step.mean_grads.items()},
        grad_sq_norms=step.grad_sq_norms / c**2,
    )
