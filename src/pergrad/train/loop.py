"""The training loop: every step through PerExample and the statistics, read top to bottom.

A run directory holds ``config.toml``, ``metrics.csv`` (one row per logged step),
``checkpoint.pt`` (model, optimizer, batch position, RNG and statistics state; saved with
every logged row and at every epoch's end) and ``report.html``. Files are written atomically;
resuming continues from the checkpoint with the same losses an uninterrupted run would have
had, and drops metrics rows logged after it.

Every step is one global batch of ``batch_size`` examples, split over the data-parallel workers
and ``accumulate`` micro-batches each; the gradient and the statistics are merged to those of the
global batch (:mod:`pergrad.distributed`), so the run does not depend on the split.

With Adam, the statistics also keep B_P = tr(PΣ)/GᵀPG, the noise scale in Adam's metric
P = 1/(√v̂ + ε) (:func:`~pergrad.stats.adam_preconditioner`), logged as ``b_precond``.

With ``batch_size = "auto"``, before each step an :class:`~pergrad.stats.AdaptiveBatchSize`
reads the smoothed noise scale of the optimizer (B_simple for SGD, B_P for Adam) and its 95% interval
and may change B (and the learning rate with it); the batch is then the next B examples of the
epoch's permutation (:meth:`BatchOrder.take`).
The checkpoint keeps the rule and the batch sizes used so far (``batch_sizes``: the steps where
B changed), so a resumed run makes the same decisions, and the report can rebuild the batches.

With ``measure_every = k`` the statistics are measured on steps 0, k, 2k, … only; the other steps
run inside :meth:`DistributedPerExample.paused` (the same gradient, nothing captured) and end with
:meth:`~DistributedPerExample.plain_step`. The smoothing's β applies per measured step, the
adaptive batch size moves only after a measured step, and a row whose steps include no measured one
has the loss and validation columns and empty statistics.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .. import distributed
from .._tensors import flatten
from ..distributed import DistributedPerExample
from ..stats import AdaptiveBatchSize, GradientAlignment, NoiseScale, ParamSNR, adam_preconditioner, norm_quantiles
from ..stats.smoothing import is_measured
from . import fsdp
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import ConfigError, TrainConfig
from .data import Dataset, load_dataset
from .losses import per_example_accuracy, per_example_losses
from .metrics import Column, MetricsLog, read_metrics
from .models import build_model
from .sampler import BatchOrder
from .suite import sampling_warning
from .tensorboard import TensorBoardLog

__all__ = [
    "RunResult", "train", "prepare_run_dir", "batch_size_rule", "QUANTILES", "ALIGNMENT_SKETCH", "ALIGNMENT_STEPS",
    "INTERVAL_LEVEL",
]  # fmt: skip

QUANTILES = tuple(q for _, q in Column.NORM_QUANTILES)
ALIGNMENT_SKETCH = 512  # count-sketch size of the batch gradients kept for the alignment test
ALIGNMENT_STEPS = 4096  # most recent steps kept for it (bounds checkpoint size in long runs)
INTERVAL_LEVEL = 0.95  # confidence of the logged B_simple interval, which --batch-size auto follows


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
    measured: int = 0  # steps with statistics (all but those that measure_every skips)

    def add(self, sums: torch.Tensor, examples: int, sq_norms: torch.Tensor | None, task: str) -> None:
        """Add one step: ``sums`` = (Σ loss, Σ correct) over its examples, (examples,) sq_norms
        (None for a step not measured)."""
        self.loss += float(sums[0])
        self.correct += 0.0 if task == "regression" else float(sums[1])
        self.examples += examples
        self.steps += 1
        if sq_norms is not None:
            self.measured += 1
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
        raise ConfigError(
            f"cannot write to output directory {run_dir} ({err.strerror}): choose another with --out"
        ) from None
    return run_dir


def _optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr)
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)


def batch_size_rule(config: TrainConfig) -> AdaptiveBatchSize | None:
    """The rule of a ``batch_size = "auto"`` run (None for a fixed batch size): B between the
    config's bounds, the learning rate scaled linearly for SGD and as √B for Adam."""
    if not config.auto:
        return None
    scaling = "sqrt" if config.optimizer == "adam" else "linear"
    return AdaptiveBatchSize(config.min_batch_size, config.max_batch_size, lr_scaling=scaling)


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
    tensorboard: bool = False,
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
        tensorboard: also write every row as TensorBoard scalars, with a histogram of the
            per-example norms, into the run directory (:mod:`pergrad.train.tensorboard`).

    Returns:
        A :class:`RunResult` (rows are rank 0's; other ranks' lists are empty).

    Raises:
        ConfigError: bad settings, settings that differ between ranks, a batch size that
            does not split into workers × micro-batches, or tensorboard without its package.
        CheckpointError: resuming from a missing or damaged checkpoint.
    """
    stream = stream or sys.stderr
    run, state = _setup(config, resume)
    if state is not None:
        _restore(run, state)
    elif run.lead:
        _start(run, stream)
    # the models have no buffers, so the forward of DDP runs no collective and a worker may skip
    # an empty micro-batch; the gradient is reduced by DistributedPerExample.step (under FSDP2, by
    # its own reduce-scatter in each backward)
    ddp = DistributedDataParallel(run.model) if run.world > 1 and not run.sharded else run.model
    progress = _Progress.for_run(run, quiet, stream)
    n = run.order.num_examples
    board = TensorBoardLog(run.run_dir, run.step if state is not None else None) if tensorboard and run.lead else None
    if board is not None:
        on_row = _also_to(board, run, on_row)
    run.model.train()
    with (
        DistributedPerExample(run.model, second_moment=True) as dpe,
        contextlib.closing(board) if board else contextlib.nullcontext(),
    ):
        while run.epoch < config.epochs:
            while run.offset < n:
                if stop_after is not None and run.step >= stop_after:
                    _checkpoint(run)
                    progress.close()
                    return RunResult(run.run_dir, run.step, run.metrics.rows, completed=False)
                batch = _next_batch(run)
                _step(run, ddp, dpe, batch)
                last = run.epoch == config.epochs - 1 and run.offset == n
                if run.step % config.log_every == 0 or last:
                    _log(run, progress, on_row)
                    run.window = _Window()
                    _checkpoint(run)
                progress.advance(batch.numel())
            run.epoch, run.offset = run.epoch + 1, 0
            _checkpoint(run)
    progress.close()
    return RunResult(run.run_dir, run.step, run.metrics.rows, completed=True)


@dataclass
class _Statistics:
    """The run's streaming statistics, updated with every merged step and saved in checkpoints."""

    noise: NoiseScale
    two_batch: NoiseScale
    snr: ParamSNR
    alignment: GradientAlignment
    precond: NoiseScale | None = None  # B_P in the optimizer's metric (Adam), else None

    @classmethod
    def for_run(cls, config: TrainConfig, optimizer: torch.optim.Optimizer, model: nn.Module) -> _Statistics:
        precond = None
        if config.optimizer == "adam":
            precond = NoiseScale(beta=config.noise_beta, preconditioner=adam_preconditioner(optimizer, model))
        return cls(
            noise=NoiseScale(beta=config.noise_beta),
            two_batch=NoiseScale(beta=config.noise_beta),
            snr=ParamSNR(beta=config.noise_beta),
            alignment=GradientAlignment(ALIGNMENT_SKETCH, seed=config.seed, max_steps=ALIGNMENT_STEPS),
            precond=precond,
        )

    @property
    def follows(self) -> NoiseScale:
        """The noise scale of the optimizer's geometry: B_P under Adam, B_simple under SGD."""
        return self.noise if self.precond is None else self.precond

    def preconditioner(self) -> dict[str, torch.Tensor] | None:
        """Adam's P now (None under SGD, or before Adam's first step). Read before the optimizer
        steps on the batch: P then does not depend on the batch it weighs, so tr(PΣ)̂ and GᵀPĜ
        stay unbiased."""
        return None if self.precond is None else self.precond.preconditioner()

    def update(self, merged, weights: dict[str, torch.Tensor] | None = None) -> None:
        """Add one step's merged result (:meth:`DistributedPerExample.step`); ``weights``, the
        :meth:`preconditioner` read before the step, for B_P."""
        self.noise.update_estimate(merged.estimate(), merged.names)
        if weights is not None:
            self.precond.update_estimate(merged.estimate(preconditioner=weights), merged.names)
        self.snr.update_sums(merged.second_moment, merged.mean_grads, merged.n)
        two = merged.two_batch_estimate()
        if two is not None:
            self.two_batch.update_estimate(two)
        self.alignment.update(flatten(merged.mean_grads.values()).cpu())

    def state_dict(self) -> dict:
        return {
            "noise_scale": self.noise.state_dict(),
            "two_batch": self.two_batch.state_dict(),
            "snr": self.snr.state_dict(),
            "alignment": self.alignment.state_dict(),
            **({} if self.precond is None else {"precond": self.precond.state_dict()}),
        }

    def load_state_dict(self, state: dict) -> None:
        self.noise.load_state_dict(state["noise_scale"])
        if self.precond is not None and "precond" in state:
            self.precond.load_state_dict(state["precond"])
        if "two_batch" in state:
            self.two_batch.load_state_dict(state["two_batch"])
        self.snr.load_state_dict(state["snr"])
        self.alignment.load_state_dict(state["alignment"])


@dataclass
class _Run:
    """One run's objects and its position in the batch order: what the stages read and change."""

    config: TrainConfig
    run_dir: Path
    rank: int
    world: int
    device: torch.device
    dataset: Dataset
    model: nn.Module
    optimizer: torch.optim.Optimizer
    order: BatchOrder
    stats: _Statistics
    metrics: MetricsLog
    rule: AdaptiveBatchSize | None
    window: _Window = field(default_factory=_Window)
    step: int = 0
    epoch: int = 0
    offset: int = 0  # examples of the epoch's permutation taken so far
    examples: int = 0  # examples seen since the start of the run
    batch_sizes: list[tuple[int, int]] = field(default_factory=list)  # (first step, B) at each change

    @property
    def lead(self) -> bool:
        """Whether this is rank 0, which reads and writes the run directory and prints."""
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """Whether the model is sharded with FSDP2 (``--fsdp`` in a process group)."""
        return self.config.shard == "fsdp" and dist.is_initialized()

    @property
    def batch_size(self) -> int:
        """B in force: the rule's for ``auto``, else the config's."""
        return self.config.batch_size if self.rule is None else self.rule.batch_size


def _setup(config: TrainConfig, resume: bool) -> tuple[_Run, dict | None]:
    """Check the settings on every rank, open the run directory and build a fresh run; also
    return the checkpoint's state when resuming (None otherwise)."""
    rank, world = distributed.rank_and_world()
    try:
        distributed.check_same_settings(config.to_dict())
    except ValueError as err:
        raise ConfigError(str(err)) from None
    config.check_split(world)
    run_dir, state = _open_run_dir(config, resume, rank == 0)
    dataset = load_dataset(config)
    device = _device()
    model = build_model(config, dataset).to(device)
    if config.shard == "fsdp" and dist.is_initialized():
        fsdp.shard_model(model)
    optimizer = _optimizer(config, model)
    run = _Run(
        config=config,
        run_dir=run_dir,
        rank=rank,
        world=world,
        device=device,
        dataset=dataset,
        model=model,
        optimizer=optimizer,
        order=BatchOrder.for_run(config, dataset),
        stats=_Statistics.for_run(config, optimizer, model),
        metrics=MetricsLog(run_dir / "metrics.csv"),
        rule=batch_size_rule(config),
        batch_sizes=[(0, config.first_batch_size)],
    )
    return run, state


def _start(run: _Run, stream) -> None:
    """A new run (rank 0): save its config and warn about a sampler that breaks the statistics."""
    run.config.save(run.run_dir / "config.toml")
    warning = sampling_warning(run.config, run.dataset)
    if warning:
        print(warning, file=stream, flush=True)


def _restore(run: _Run, state: dict) -> None:
    """Continue from a checkpoint: weights, optimizer, statistics, window, position and RNG; rank 0
    drops the metrics rows logged after the checkpoint.

    Raises:
        CheckpointError: a checkpoint from before the position was counted in examples.
    """
    if "offset" not in state:
        raise CheckpointError(
            f"{run.run_dir / 'checkpoint.pt'} was written by an older pergrad (its position is in batches, "
            "not examples): start a new run"
        )
    if "sharded" in state:  # every rank reads its shards, on any number of workers
        if not run.sharded:
            raise CheckpointError(
                f"{run.run_dir} holds a sharded (--fsdp) checkpoint: resume it under torchrun with --fsdp"
            )
        fsdp.load_sharded(run.run_dir / state["sharded"], run.model, run.optimizer)
    elif run.sharded:
        raise CheckpointError(f"{run.run_dir} holds an unsharded checkpoint: resume it without --fsdp")
    else:
        run.model.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
    run.stats.load_state_dict(state)
    run.window = _Window(**{"measured": state["window"]["steps"], **state["window"]})  # (older: all measured)
    run.step, run.epoch, run.offset, run.examples = state["step"], state["epoch"], state["offset"], state["examples"]
    run.batch_sizes = [tuple(change) for change in state["batch_sizes"]]
    if run.rule is not None:
        run.rule.load_state_dict(state["batch_size_rule"])
    torch.set_rng_state(state["rng"])
    if run.lead:
        path = run.metrics.path
        logged = read_metrics(path) if path.exists() else []
        run.metrics = MetricsLog(path, [r for r in logged if r[Column.STEP] <= run.step])
        run.metrics.flush()


def _next_batch(run: _Run) -> torch.Tensor:
    """The next global batch, (B,) example indices; with ``auto``, after a measured step, B first
    follows the noise scale, and the learning rate follows B."""
    rule = run.rule
    after_measured = run.step == 0 or is_measured(run.step - 1, run.config.measure_every)  # else nothing new
    if (
        rule is not None
        and after_measured
        and rule.update(run.stats.follows.estimate(INTERVAL_LEVEL)) != run.batch_sizes[-1][1]
    ):
        run.batch_sizes.append((run.step, rule.batch_size))
        for group in run.optimizer.param_groups:
            group["lr"] = run.config.lr * rule.lr_factor
    return run.order.take(run.epoch, run.offset, run.batch_size)


def _step(run: _Run, ddp: nn.Module, dpe: DistributedPerExample, batch: torch.Tensor) -> None:
    """One optimizer step on one global batch (``batch``: its example indices); updates the
    statistics (on a measured step) and the window and advances the position."""
    run.optimizer.zero_grad(set_to_none=True)
    if is_measured(run.step, run.config.measure_every):
        local, sq_norms = _backward_micro_batches(run, ddp, dpe, batch)
        merged = dpe.step(sums=local)  # p.grad: the global batch's mean gradient
        weights = run.stats.preconditioner()
        run.optimizer.step()
        if run.sharded:
            merged = fsdp.whole(merged)
            weights = fsdp.whole_tensors(weights)
        run.stats.update(merged, weights)
        run.window.add(merged.sums, merged.n, distributed.all_gather_cat(sq_norms), run.dataset.task)
    else:
        with dpe.paused():
            local, _ = _backward_micro_batches(run, ddp, dpe, batch)
            n, sums = dpe.plain_step(sums=local)  # p.grad: the same mean gradient, nothing measured
        run.optimizer.step()
        run.window.add(sums, n, None, run.dataset.task)
    run.step += 1
    run.offset += batch.numel()
    run.examples += batch.numel()


def _backward_micro_batches(
    run: _Run, ddp: nn.Module, dpe: DistributedPerExample, batch: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward of this rank's micro-batches of ``batch``, without synchronising.

    Returns:
        (2,) float64 (Σ loss, Σ correct) over this rank's examples, and their (examples,)
        float64 per-example squared gradient norms (none inside ``dpe.paused()``).
    """
    local = torch.zeros(2, dtype=torch.float64)
    sq_norms = [torch.zeros(0, dtype=torch.float64)]
    task = run.dataset.task
    micro_batches = run.config.micro_batches_per_worker(batch.numel())
    for idx in run.order.micro_batches(batch, run.rank, run.world, micro_batches):
        if idx.numel() == 0:  # a last, small batch may leave a worker without examples
            if run.sharded:  # FSDP2's gathers and reduce-scatters need every rank
                dpe.idle_backward(ddp, run.dataset.train_x[:0].to(run.device))
            continue
        x, y = run.dataset.train_x[idx].to(run.device), run.dataset.train_y[idx].to(run.device)
        with distributed.no_sync(ddp):
            out = ddp(x)
            losses = per_example_losses(task, out, y)
            result = dpe.backward(losses)  # None when paused
        accuracy = per_example_accuracy(task, out, y)
        local[0] += losses.detach().double().sum().item()
        local[1] += 0.0 if accuracy is None else accuracy.double().sum().item()
        if result is not None:
            sq_norms.append(result.sq_norms.detach().double().cpu())
    return local, torch.cat(sq_norms)


def _also_to(board: TensorBoardLog, run: _Run, on_row: Callable[[dict], None] | None) -> Callable[[dict], None]:
    """``on_row`` that also writes the row and its window's per-example norms to TensorBoard."""

    def both(row: dict) -> None:
        board.add(row, run.window.norms)
        if on_row:
            on_row(row)

    return both


def _log(run: _Run, progress: _Progress, on_row: Callable[[dict], None] | None) -> None:
    """Rank 0 appends a metrics row for the steps since the previous one and shows it (a sharded
    model's validation forward runs on every rank)."""
    validation = evaluate(run.model, run.dataset) if run.lead or run.sharded else None
    if not run.lead:
        return
    row = _row(run, validation)
    run.metrics.append(row)
    progress.log(row)
    if on_row:
        on_row(row)


def _checkpoint(run: _Run) -> None:
    """Rank 0 saves everything needed to continue exactly from here; a sharded model's shards are
    saved first by every rank (:mod:`pergrad.train.fsdp`), then ``checkpoint.pt`` names them."""
    state: dict[str, Any] = {}  # the model's and optimizer's
    if run.sharded:
        folder = f"{run.step}-{run.epoch}-{run.offset}"
        state = {"sharded": fsdp.save_sharded(run.run_dir, folder, run.model, run.optimizer)}
        fsdp.barrier()  # every rank's shards are written
    elif run.lead:
        state = {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict()}
    if not run.lead:
        return
    save_checkpoint(
        run.run_dir / "checkpoint.pt",
        {
            "config": run.config.to_dict(),
            **state,
            **run.stats.state_dict(),
            "window": run.window.__dict__.copy(),
            "step": run.step,
            "epoch": run.epoch,
            "offset": run.offset,
            "examples": run.examples,
            "batch_sizes": run.batch_sizes,
            **({} if run.rule is None else {"batch_size_rule": run.rule.state_dict()}),
            "rng": torch.get_rng_state(),
        },
    )
    if run.sharded:
        fsdp.prune_sharded(run.run_dir, state["sharded"])


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


def _row(run: _Run, validation: tuple[float, float | None]) -> dict:
    """One metrics row: the window's means, ``validation`` (loss, accuracy), and the smoothed
    statistics if a step of the window was measured (``measure_every``), else none."""
    window = run.window
    val_loss, val_accuracy = validation
    row = {
        Column.STEP: run.step,
        Column.EPOCH: run.epoch,
        Column.EXAMPLES: run.examples,
        Column.LR: run.optimizer.param_groups[0]["lr"],
        Column.BATCH_SIZE: run.batch_size,
        Column.LOSS: window.loss / window.examples,
        Column.ACCURACY: None if run.dataset.task == "regression" else window.correct / window.examples,
        Column.VAL_LOSS: val_loss,
        Column.VAL_ACCURACY: val_accuracy,
    }
    if window.measured:
        row.update(_statistics_columns(run))
    return row


def _statistics_columns(run: _Run) -> dict:
    """The statistics of a row: smoothed noise scale and SNR, per-example norms of the window's
    measured steps, the cosine between their batch gradients."""
    window, stats = run.window, run.stats
    estimate = stats.noise.estimate(INTERVAL_LEVEL)  # one read-out of the smoothed sums for the whole row
    norms = torch.tensor(window.norms, dtype=torch.float64)
    quantiles = norm_quantiles(norms, QUANTILES)
    row = {
        Column.B_SIMPLE: _finite_or_none(estimate.b_simple),
        Column.B_SIMPLE_LOW: _finite_or_none(estimate.lower),
        Column.B_SIMPLE_HIGH: _finite_or_none(estimate.upper),
        Column.TRACE_SIGMA: _finite_or_none(estimate.trace_sigma),
        Column.GRAD_SQ_NORM: _finite_or_none(estimate.grad_sq_norm),
        **{Column.norm(label): float(v) for (label, _), v in zip(Column.NORM_QUANTILES, quantiles, strict=True)},
        Column.NORM_MAX: float(norms.max()),
    }
    row.update({Column.snr(name): _finite_or_none(v) for name, v in stats.snr.layer_snr().items()})
    row[Column.GRAD_COSINE] = _finite_or_none(stats.alignment.recent_cosine(window.measured))
    if stats.precond is not None:
        p = stats.precond.estimate(INTERVAL_LEVEL)
        row[Column.B_PRECOND] = _finite_or_none(p.b_simple)
        row[Column.B_PRECOND_LOW] = _finite_or_none(p.lower)
        row[Column.B_PRECOND_HIGH] = _finite_or_none(p.upper)
    if stats.two_batch.state is not None:
        row[Column.B_SIMPLE_TWO_BATCH] = _finite_or_none(stats.two_batch.b_simple)
    return row


def _finite_or_none(value) -> float | None:
    """Floats for the CSV: NaN (not yet known) becomes empty; +inf (unbounded) stays."""
    value = float(value)
    return None if math.isnan(value) else value


class _Progress:
    """A tqdm bar with epoch, loss, validation accuracy and B_simple (and B for ``auto``); or
    plain lines when quiet. It counts steps, or examples when the number of steps is unknown
    (``auto``)."""

    def __init__(self, total: int, done: int, quiet: bool, stream, enabled: bool = True, unit: str = "step"):
        self.quiet, self.stream, self.enabled, self.unit = quiet, stream, enabled, unit
        self.bar = None
        if enabled and not quiet:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, file=stream, unit=unit, dynamic_ncols=True, leave=True)

    @classmethod
    def for_run(cls, run: _Run, quiet: bool, stream) -> _Progress:
        epochs = run.config.epochs
        if run.rule is None:
            return cls(run.order.steps_per_epoch() * epochs, run.step, quiet, stream, run.lead)
        total = run.order.num_examples * epochs
        return cls(total, run.order.num_examples * run.epoch + run.offset, quiet, stream, run.lead, unit="example")

    def log(self, row: dict) -> None:
        fields = {
            "epoch": row[Column.EPOCH] + 1,
            "loss": f"{row[Column.LOSS]:.4f}",
            "val_acc": "-" if row[Column.VAL_ACCURACY] is None else f"{row[Column.VAL_ACCURACY]:.3f}",
            "B_simple": "-" if row.get(Column.B_SIMPLE) is None else f"{row[Column.B_SIMPLE]:.1f}",
        }
        if self.unit == "example":
            fields["B"] = row[Column.BATCH_SIZE]
        if self.bar is not None:
            self.bar.set_postfix(fields, refresh=False)
        elif self.enabled:
            text = " ".join(f"{k}={v}" for k, v in fields.items())
            print(f"step {row[Column.STEP]}: {text}", file=self.stream, flush=True)

    def advance(self, examples: int) -> None:
        """After a step of ``examples`` examples."""
        if self.bar is not None:
            self.bar.update(examples if self.unit == "example" else 1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
