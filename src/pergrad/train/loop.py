"""The training loop: every step through PerExample and the statistics, read top to bottom.

A run directory holds ``config.toml``, ``metrics.csv`` (one row per logged step),
``checkpoint.pt`` (model, optimizer, batch position, RNG and statistics state; saved with
every logged row and at every epoch's end) and ``report.html``. Files are written atomically;
resuming continues from the checkpoint with the same losses an uninterrupted run would have
had, and drops metrics rows logged after it.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..checks.sampling import GradientAlignment
from ..checks.suite import sampling_warning
from ..per_example import PerExample
from ..stats import NoiseScale, ParamSNR, norm_quantiles
from .checkpoint import load_checkpoint, save_checkpoint
from .config import ConfigError, TrainConfig
from .data import Dataset, load_dataset
from .losses import per_example_accuracy, per_example_losses
from .metrics import MetricsLog, read_metrics
from .models import build_model
from .sampler import BatchOrder

__all__ = ["RunResult", "train", "prepare_run_dir", "QUANTILES", "ALIGNMENT_SKETCH", "ALIGNMENT_STEPS"]

QUANTILES = (0.1, 0.5, 0.9)
ALIGNMENT_SKETCH = 512  # count-sketch size of the batch gradients kept for the alignment test
ALIGNMENT_STEPS = 4096  # most recent steps kept for it (bounds checkpoint size in long runs)


@dataclass
class RunResult:
    """What a finished (or stopped) run left behind."""

    run_dir: Path
    step: int
    rows: list[dict]
    completed: bool


@dataclass
class _Window:
    """Sums over the steps since the last logged row (saved in checkpoints, for exact resume)."""

    loss: float = 0.0
    correct: float = 0.0
    examples: int = 0
    steps: int = 0
    norms: list[float] = field(default_factory=list)

    def add(self, losses: torch.Tensor, accuracy: torch.Tensor | None, sq_norms: torch.Tensor) -> None:
        self.loss += losses.detach().double().sum().item()
        self.correct += 0.0 if accuracy is None else accuracy.double().sum().item()
        self.examples += losses.shape[0]
        self.steps += 1
        self.norms += sq_norms.double().sqrt().tolist()


def prepare_run_dir(path: str | Path) -> Path:
    """Create the run directory and check that it is writable.

    Raises:
        ConfigError: it cannot be created or written, with what to do.
    """
    run_dir = Path(path)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"cannot write to output directory {run_dir} ({err.strerror}): choose another with --out") from None
    return run_dir


def _optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr)
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 512) -> tuple[float, float | None]:
    """Mean loss and accuracy (None for regression) on the validation split."""
    was_training = model.training
    model.eval()
    loss, correct, n = 0.0, 0.0, dataset.val_x.shape[0]
    for start in range(0, n, batch_size):
        x, y = dataset.val_x[start : start + batch_size], dataset.val_y[start : start + batch_size]
        out = model(x)
        loss += per_example_losses(dataset.task, out, y).double().sum().item()
        accuracy = per_example_accuracy(dataset.task, out, y)
        correct += 0.0 if accuracy is None else accuracy.double().sum().item()
    model.train(was_training)
    return loss / n, (None if dataset.task == "regression" else correct / n)


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    quiet: bool = False,
    stop_after: int | None = None,
    on_row: Callable[[dict], None] | None = None,
    stream=None,
) -> RunResult:
    """Train as the config says, writing the run directory ``config.out``.

    Args:
        config: the run's configuration (on resume, the one saved in the run directory).
        resume: continue from ``config.out``'s checkpoint instead of starting afresh.
        quiet: plain log lines instead of a progress bar.
        stop_after: stop (with a checkpoint) after this many steps in total, as an
            interruption would; None runs to the end.
        on_row: called with every logged row.
        stream: where progress goes (default stderr).

    Returns:
        A :class:`RunResult`.
    """
    stream = stream or sys.stderr
    run_dir = prepare_run_dir(config.out)
    dataset = load_dataset(config)
    model = build_model(config, dataset)
    optimizer = _optimizer(config, model)
    order = BatchOrder(dataset.train_x.shape[0], config.batch_size, config.seed, config.order, dataset.labels)
    noise = NoiseScale(beta=config.noise_beta)
    snr = ParamSNR(beta=config.noise_beta)
    alignment = GradientAlignment(ALIGNMENT_SKETCH, seed=config.seed, max_steps=ALIGNMENT_STEPS)
    window = _Window()
    step, epoch, batch_in_epoch = 0, 0, 0
    metrics = MetricsLog(run_dir / "metrics.csv")

    if resume:
        state = load_checkpoint(run_dir / "checkpoint.pt")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        noise.load_state_dict(state["noise_scale"])
        snr.load_state_dict(state["snr"])
        alignment.load_state_dict(state["alignment"])
        window = _Window(**state["window"])
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        torch.set_rng_state(state["rng"])
        kept = [r for r in read_metrics(run_dir / "metrics.csv") if r["step"] <= step] if (run_dir / "metrics.csv").exists() else []
        metrics = MetricsLog(run_dir / "metrics.csv", kept)
        metrics.flush()
    else:
        config.save(run_dir / "config.toml")
        warning = sampling_warning(config, dataset)
        if warning:
            print(warning, file=stream, flush=True)

    steps_per_epoch = order.steps_per_epoch()
    total_steps = steps_per_epoch * config.epochs
    progress = _Progress(total_steps, step, quiet, stream)

    def checkpoint() -> None:
        save_checkpoint(
            run_dir / "checkpoint.pt",
            {
                "config": config.to_dict(),
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "noise_scale": noise.state_dict(),
                "snr": snr.state_dict(),
                "alignment": alignment.state_dict(),
                "window": window.__dict__.copy(),
                "step": step,
                "epoch": epoch,
                "batch_in_epoch": batch_in_epoch,
                "rng": torch.get_rng_state(),
            },
        )

    model.train()
    with PerExample(model, second_moment=True) as pe:
        while epoch < config.epochs:
            batches = order.batches(epoch)
            while batch_in_epoch < len(batches):
                if stop_after is not None and step >= stop_after:
                    checkpoint()
                    progress.close()
                    return RunResult(run_dir, step, metrics.rows, completed=False)
                idx = batches[batch_in_epoch]
                x, y = dataset.train_x[idx], dataset.train_y[idx]

                optimizer.zero_grad(set_to_none=True)
                out = model(x)
                losses = per_example_losses(dataset.task, out, y)
                result = pe.backward(losses, reduction="mean")
                optimizer.step()

                noise.update(result)
                snr.update(result)
                alignment.update(torch.cat([g.reshape(-1) for g in result.batch_grads.values()]))
                window.add(losses, per_example_accuracy(dataset.task, out, y), result.sq_norms)
                step += 1
                batch_in_epoch += 1
                last = epoch == config.epochs - 1 and batch_in_epoch == len(batches)
                if step % config.log_every == 0 or last:
                    row = _row(config, step, epoch, model, dataset, noise, snr, window)
                    row["grad_cosine"] = _finite_or_none(alignment.recent_cosine(window.steps))
                    window = _Window()
                    metrics.append(row)
                    checkpoint()
                    progress.log(row)
                    if on_row:
                        on_row(row)
                progress.advance()
            epoch, batch_in_epoch = epoch + 1, 0
            checkpoint()
    progress.close()
    return RunResult(run_dir, step, metrics.rows, completed=True)


def _row(config, step, epoch, model, dataset, noise, snr, window) -> dict:
    """One metrics row: the window's means, validation, and the smoothed statistics."""
    val_loss, val_accuracy = evaluate(model, dataset)
    estimate = noise.estimate(0.95)  # one read-out of the smoothed sums for the whole row
    norms = torch.tensor(window.norms, dtype=torch.float64)
    quantiles = norm_quantiles(norms, QUANTILES)
    row = {
        "step": step,
        "epoch": epoch,
        "examples": step * config.batch_size,
        "lr": config.lr,
        "batch_size": config.batch_size,
        "loss": window.loss / window.examples,
        "accuracy": None if dataset.task == "regression" else window.correct / window.examples,
        "val_loss": val_loss,
        "val_accuracy": val_accuracy,
        "b_simple": _finite_or_none(estimate.b_simple),
        "b_simple_low": _finite_or_none(estimate.lower),
        "b_simple_high": _finite_or_none(estimate.upper),
        "trace_sigma": _finite_or_none(estimate.trace_sigma),
        "grad_sq_norm": _finite_or_none(estimate.grad_sq_norm),
        **{f"norm_q{round(q * 100):02d}": float(v) for q, v in zip(QUANTILES, quantiles)},
        "norm_max": float(norms.max()),
    }
    row.update({f"snr/{name}": _finite_or_none(v) for name, v in snr.layer_snr().items()})
    return row


def _finite_or_none(value) -> float | None:
    """Floats for the CSV: NaN (not yet known) becomes empty; +inf (unbounded) stays."""
    value = float(value)
    return None if math.isnan(value) else value


class _Progress:
    """A tqdm bar with epoch, loss, validation accuracy and B_simple; or plain lines when quiet."""

    def __init__(self, total: int, done: int, quiet: bool, stream):
        self.quiet, self.stream = quiet, stream
        self.bar = None
        if not quiet:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, file=stream, unit="step", dynamic_ncols=True, leave=True)

    def log(self, row: dict) -> None:
        fields = {
            "epoch": row["epoch"] + 1,
            "loss": f"{row['loss']:.4f}",
            "val_acc": "-" if row["val_accuracy"] is None else f"{row['val_accuracy']:.3f}",
            "B_simple": "-" if row["b_simple"] is None else f"{row['b_simple']:.1f}",
        }
        if self.bar is not None:
            self.bar.set_postfix(fields, refresh=False)
        else:
            text = " ".join(f"{k}={v}" for k, v in fields.items())
            print(f"step {row['step']}: {text}", file=self.stream, flush=True)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
