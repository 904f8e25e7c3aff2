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
over the W workers in the statistics' one ``all_reduce``.

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

from dataclasses import replace
from pathlib import Path

import torch
from transformers import TrainerCallback

from ..distributed import StepResult
from ..per_example import PerExample
from ..train.metrics import Column
from ._step import RunDirectory, StepStatistics

__all__ = ["PergradCallback"]


class PergradCallback(TrainerCallback):
    """Per-example gradient statistics of every optimizer step, added to the Trainer's logs.

    Args:
        beta: smoothing factor in (0, 1] of the noise scale and SNR over steps.
        run_dir: also write ``config.toml`` and ``metrics.csv`` there (main process, a row at
            every training log) for ``pergrad report RUN_DIR``; None for none.
        on_unsupported: as for :class:`~pergrad.PerExample`.

    Attributes:
        statistics: the :class:`~pergrad.integrations._step.StepStatistics` kept so far.
    """

    def __init__(self, beta: float = 0.95, *, run_dir: str | Path | None = None, on_unsupported: str = "auto"):
        self.beta = beta
        self.run_dir = run_dir
        self.on_unsupported = on_unsupported
        self.statistics = StepStatistics(beta)
        self._pe: PerExample | None = None
        self._run: RunDirectory | None = None
        self._summed: dict[str, torch.Tensor] = {}  # ḡ_w × loss scale, while clipping is on
        self._handles: list = []
        self._batch_size = 0

    @classmethod
    def attach(cls, trainer, **options) -> "PergradCallback":
        """A new callback (``options`` as for the constructor), placed before ``trainer``'s other
        callbacks so that the ``report_to`` integrations log its metrics too; returns it."""
        callback = cls(**options)
        trainer.callback_handler.callbacks.insert(0, callback)
        return callback

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._pe = PerExample(model, second_moment=True, on_unsupported=self.on_unsupported, verify=False)
        if args.max_grad_norm and args.max_grad_norm > 0:
            for name, p in model.named_parameters():
                if p.requires_grad:
                    self._summed[name] = torch.zeros_like(p, dtype=torch.float64)
                    self._handles.append(p.register_hook(_adder(self._summed[name])))
        if self.run_dir is not None and state.is_world_process_zero:
            self._run = RunDirectory(self.run_dir, {
                "framework": "transformers", "beta": self.beta,
                "accumulate": args.gradient_accumulation_steps, "workers": args.world_size,
                "max_grad_norm": float(args.max_grad_norm or 0.0),
            })  # fmt: skip

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        scaler = getattr(optimizer, "scaler", None)
        loss_scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        # accelerate unscales .grad when the Trainer measures (and clips) its norm, before this
        result = self._pe.result("mean", loss_scale=loss_scale, grad_scale=1.0)
        if not self._summed:
            step = self.statistics.merge(result)
        else:
            dot = sum(float((result.batch_grads[k].double() * s).sum()) for k, s in self._summed.items())
            step = _unclipped(self.statistics.merge(result, torch.tensor([dot / loss_scale])), args.world_size)
            for s in self._summed.values():
                s.zero_()
        self.statistics.follow_optimizer(optimizer, self._pe.model)
        self.statistics.add(step)
        self._batch_size = step.n

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs or self.statistics.steps == 0:
            return  # not a training log
        metrics = self.statistics.metrics()
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
                **self.statistics.values(),
            })  # fmt: skip

    def on_train_end(self, args, state, control, **kwargs):
        if self._pe is not None:
            self._pe.remove()
            self._pe = None
        for handle in self._handles:
            handle.remove()
        self._handles, self._summed = [], {}


def _adder(total: torch.Tensor):
    """A gradient hook adding each backward's gradient of a parameter into ``total`` (float64)."""

    def add(grad: torch.Tensor) -> None:
        total.add_(grad.detach())

    return add


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
