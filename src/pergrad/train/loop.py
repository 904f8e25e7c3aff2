"""The training loop: every step through PerExample and the statistics, read top to bottom.

A run directory holds ``config.toml``, ``metrics.csv`` (one row per logged step),
``checkpoint.pt`` (model, optimizer, batch position, RNG and statistics state; saved with
every logged row and at every epoch's end) and ``report.html``. Files are written atomically;
resuming continues from the checkpoint with the same losses an uninterrupted run would have
had, and drops metrics rows logged after it.

Every step is one global batch of ``batch_size`` examples, split over the data-parallel workers
and ``accumulate`` micro-batches each; the gradient and the statistics are merged to those of the
global batch (:mod:`pergrad.distributed`), so the run does not depend on the split.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..checks.sampling import GradientAlignment
from ..checks.suite import sampling_warning
from .. import distributed
from ..distributed import DistributedPerExample
from ..stats import NoiseScale, ParamSNR, norm_quantiles
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
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

    def add(self, sums: torch.Tensor, examples: int, sq_norms: torch.Tensor, task: str) -> None:
        """Add one step: ``sums`` = (Σ loss, Σ correct) over its examples, (examples,) sq_norms."""
        self.loss += float(sums[0])
        self.correct += 0.0 if task == "regression" else float(sums[1])
        self.examples += examples
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
        device = next(model.parameters()).device
        x = dataset.val_x[start : start + batch_size].to(device)
        y = dataset.val_y[start : start + batch_size].to(device)
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

    In a process group (``torchrun``, see :func:`pergrad.distributed.init_from_env`) every rank
    calls it: the model is wrapped in DistributedDataParallel, each rank runs its
    ``config.accumulate`` micro-batches of each global batch (see :class:`BatchOrder`), and
    :class:`~pergrad.distributed.DistributedPerExample` merges the gradients and statistics, so
    every rank holds the same state. Only rank 0 reads and writes the run directory and prints.

    Args:
        config: the run's configuration (on resume, the one saved in the run directory). It must
            be the same on every rank.
        resume: continue from ``config.out``'s checkpoint instead of starting afresh (rank 0's
            value counts); the number of workers may differ from the run that wrote it.
        quiet: plain log lines instead of a progress bar.
        stop_after: stop (with a checkpoint) after this many steps in total, as an
            interruption would; None runs to the end.
        on_row: called with every logged row (on rank 0).
        stream: where progress goes (default stderr).

    Returns:
        A :class:`RunResult` (rows are rank 0's; other ranks' lists are empty).

    Raises:
        ConfigError: bad settings, settings that differ between ranks, or a batch size that
            does not split into workers × micro-batches.
        CheckpointError: resuming from a missing or damaged checkpoint.
    """
    stream = stream or sys.stderr
    rank, world = distributed.rank_and_world()
    lead = rank == 0
    try:
        distributed.check_same_settings(config.to_dict())
    except ValueError as err:
        raise ConfigError(str(err)) from None
    config.check_split(world)
    run_dir, state = _open_run_dir(config, resume, lead)
    device = _device()
    dataset = load_dataset(config)
    model = build_model(config, dataset).to(device)
    optimizer = _optimizer(config, model)
    order = BatchOrder.for_run(config, dataset)
    noise = NoiseScale(beta=config.noise_beta)
    two_batch = NoiseScale(beta=config.noise_beta)
    snr = ParamSNR(beta=config.noise_beta)
    alignment = GradientAlignment(ALIGNMENT_SKETCH, seed=config.seed, max_steps=ALIGNMENT_STEPS)
    window = _Window()
    step, epoch, batch_in_epoch = 0, 0, 0
    metrics = MetricsLog(run_dir / "metrics.csv")

    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        noise.load_state_dict(state["noise_scale"])
        if "two_batch" in state:
            two_batch.load_state_dict(state["two_batch"])
        snr.load_state_dict(state["snr"])
        alignment.load_state_dict(state["alignment"])
        window = _Window(**state["window"])
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        torch.set_rng_state(state["rng"])
        if lead:
            logged = read_metrics(run_dir / "metrics.csv") if (run_dir / "metrics.csv").exists() else []
            metrics = MetricsLog(run_dir / "metrics.csv", [r for r in logged if r["step"] <= step])
            metrics.flush()
    elif lead:
        config.save(run_dir / "config.toml")
        warning = sampling_warning(config, dataset)
        if warning:
            print(warning, file=stream, flush=True)

    # the models have no buffers, so the forward of DDP runs no collective and a worker may skip
    # an empty micro-batch; the gradient is reduced by DistributedPerExample.step
    ddp = DistributedDataParallel(model) if world > 1 else model
    steps_per_epoch = order.steps_per_epoch()
    total_steps = steps_per_epoch * config.epochs
    progress = _Progress(total_steps, step, quiet, stream, enabled=lead)

    def checkpoint() -> None:
        if not lead:
            return
        save_checkpoint(
            run_dir / "checkpoint.pt",
            {
                "config": config.to_dict(),
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "noise_scale": noise.state_dict(),
                "two_batch": two_batch.state_dict(),
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
    with DistributedPerExample(model, second_moment=True) as dpe:
        while epoch < config.epochs:
            batches = order.batches(epoch)
            while batch_in_epoch < len(batches):
                if stop_after is not None and step >= stop_after:
                    checkpoint()
                    progress.close()
                    return RunResult(run_dir, step, metrics.rows, completed=False)

                optimizer.zero_grad(set_to_none=True)
                local = torch.zeros(2, dtype=torch.float64)  # Σ loss, Σ correct on this rank
                sq_norms = []
                for idx in order.micro_batches(batches[batch_in_epoch], rank, world, config.accumulate):
                    if idx.numel() == 0:  # a last, small batch may leave a worker without examples
                        continue
                    x, y = dataset.train_x[idx].to(device), dataset.train_y[idx].to(device)
                    with distributed.no_sync(ddp):
                        out = ddp(x)
                        losses = per_example_losses(dataset.task, out, y)
                        result = dpe.backward(losses)
                    accuracy = per_example_accuracy(dataset.task, out, y)
                    local[0] += losses.detach().double().sum().item()
                    local[1] += 0.0 if accuracy is None else accuracy.double().sum().item()
                    sq_norms.append(result.sq_norms.detach().double().cpu())
                merged = dpe.step(sums=local)  # p.grad: the global batch's mean gradient
                optimizer.step()

                noise.update_estimate(merged.estimate(), merged.names)
                snr.update_sums(merged.second_moment, merged.mean_grads, merged.n)
                two = merged.two_batch_estimate()
                if two is not None:
                    two_batch.update_estimate(two)
                alignment.update(torch.cat([g.reshape(-1) for g in merged.mean_grads.values()]).cpu())
                local_norms = torch.cat(sq_norms) if sq_norms else torch.zeros(0, dtype=torch.float64)
                window.add(merged.sums, merged.n, distributed.all_gather_cat(local_norms), dataset.task)
                step += 1
                batch_in_epoch += 1
                _die_for_test(step, rank)
                last = epoch == config.epochs - 1 and batch_in_epoch == len(batches)
                if lead and (step % config.log_every == 0 or last):
                    row = _row(config, step, epoch, model, dataset, noise, snr, window)
                    row["grad_cosine"] = _finite_or_none(alignment.recent_cosine(window.steps))
                    if two_batch.state is not None:
                        row["b_simple_two_batch"] = _finite_or_none(two_batch.b_simple)
                    metrics.append(row)
                    progress.log(row)
                    if on_row:
                        on_row(row)
                if step % config.log_every == 0 or last:
                    window = _Window()
                    checkpoint()
                progress.advance()
            epoch, batch_in_epoch = epoch + 1, 0
            checkpoint()
    progress.close()
    return RunResult(run_dir, step, metrics.rows, completed=True)


def _open_run_dir(config: TrainConfig, resume: bool, lead: bool) -> tuple[Path, dict | None]:
    """Rank 0 prepares the run directory and, if ``resume`` (rank 0's value counts), reads the
    checkpoint; every rank gets its state (None for a new run).

    An error on rank 0 (unwritable directory, bad checkpoint) is raised on every rank, so that
    none waits for the others.
    """
    outcome = None
    if lead:
        try:
            run_dir = prepare_run_dir(config.out)
            outcome = (None, load_checkpoint(run_dir / "checkpoint.pt") if resume else None)
        except (ConfigError, CheckpointError) as err:
            outcome = (err, None)
    error, state = distributed.broadcast_object(outcome)
    if error is not None:
        raise error
    return Path(config.out), state


def _device() -> torch.device:
    """Where this worker computes: its CUDA device under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


DIE_AT_STEP_ENV = "PERGRAD_TEST_DIE_AT_STEP"


def _die_for_test(step: int, rank: int) -> None:
    """Fault injection for the elastic-restart test: rank 1 of a first attempt (torchrun's
    TORCHELASTIC_RESTART_COUNT = 0) exits abruptly after step ``$PERGRAD_TEST_DIE_AT_STEP``."""
    target = os.environ.get(DIE_AT_STEP_ENV)
    if target is not None and int(target) == step and rank == 1 and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
        os._exit(17)


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

    def __init__(self, total: int, done: int, quiet: bool, stream, enabled: bool = True):
        self.quiet, self.stream, self.enabled = quiet, stream, enabled
        self.bar = None
        if enabled and not quiet:
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
        elif self.enabled:
            text = " ".join(f"{k}={v}" for k, v in fields.items())
            print(f"step {row['step']}: {text}", file=self.stream, flush=True)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
