"""The critical batch size, measured two ways with the trainer, beside the noise scale that predicts it.

1. The sweep (McCandlish et al. 2018): for each batch size B of a ladder of powers of two, a
   few learning rates (the best kept per B) and several seeds, train until the validation loss
   first reaches a target; S(B) steps and E(B) examples; :func:`pergrad.stats.fit_tradeoff`
   gives S_min, E_min and B_crit = E_min / S_min.
2. The branches (Merrill et al. 2025): from checkpoints of the reference run at several steps t,
   continue at k·B with the learning rate scaled by the optimizer's rule (k for SGD, √k for
   Adam) for the same number of examples; B*(t) is the largest k·B whose validation loss is not
   worse than the k = 1 branch's by more than a tolerance (:func:`branch_critical_batch`).

The run directory ``OUT`` is the reference run itself (``pergrad train`` with the given
settings, so ``pergrad report OUT`` works and shows B_simple(t)), plus::

    OUT/cbs.json              the result (:func:`run_cbs`)
    OUT/cbs/reference.json    target loss, the reference's steps to it, the branch points
    OUT/cbs/points/step-T.pt  the reference's checkpoint at step T (a branch point)
    OUT/cbs/jobs/NAME.json    one finished job (written atomically by the job itself)
    OUT/cbs/jobs/NAME/        that job's run directory

Jobs run in parallel processes; a job whose JSON exists is never run again, so an interrupted
sweep resumes where it stopped (an unfinished job restarts from its beginning).

References:
    McCandlish, Kaplan, Amodei et al. 2018, "An Empirical Model of Large-Batch Training",
    arXiv:1812.06162.
    Merrill, Arora, Groeneveld, Hajishirzi 2025, "Critical Batch Size Revisited: A Simple
    Empirical Approach to Large-Batch Language Model Training", arXiv:2505.23971.
"""

from __future__ import annotations

import io
import json
import math
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._atomic import write_atomic
from .._json import jsonable
from ..stats import fit_tradeoff
from .checkpoint import load_checkpoint, save_checkpoint
from .config import ConfigError, TrainConfig
from .data import load_dataset
from .ground_truth import linreg_noise_scales
from .loop import prepare_run_dir, train
from .metrics import Column, read_metrics
from .sampler import BatchOrder

__all__ = [
    "CBSPlan",
    "make_plan",
    "run_cbs",
    "run_job",
    "branch_critical_batch",
    "scaled_lr",
    "grid_lr",
    "default_workers",
    "RESULT",
    "TOLERANCE",
]

RESULT = "cbs.json"
TOLERANCE = 0.1  # a branch passes when its loss is at most (1 + TOLERANCE) × the k = 1 branch's
_LR_FACTORS = (0.5, 1.0, 2.0)  # learning rates tried per B, times the reference's lr moved to B (grid_lr)
_BUDGET = 2.5  # a sweep job stops unreached after 2.5× the steps (or examples) the reference needed
_ROWS = 25  # logged rows per sweep job, about: the resolution of its steps to the target
_BRANCH_STEPS = 8  # the largest branch runs at least this many steps
# what --quick gave against the full sweep on the default setup (digits, MLP, SGD, B = 32; both
# measured with this version, README "The critical batch size, measured"), written into a quick run's cbs.json
QUICK_CHECK = {
    "setup": "the default setup (digits, MLP, SGD with momentum, B = 32, target 0.132)",
    "quick": 72.5, "quick_interval": [35.9, 132.4], "full": 74.7, "full_interval": [43.9, 113.5],
    "second_target": {"target_loss": 0.181, "quick": 47.1, "quick_interval": [31.0, 87.3],
                      "full": 62.8, "full_interval": [49.3, 83.4]},
    "verdict": (
        "at the first target the quick value lies inside the full interval (3% low); at the easier target "
        "(0.181) quick gave 47.1 against 62.8, 25% low and just below the full interval (49.3 - 83.4). "
        "Read a --quick B_crit as biased low by up to about 25% on this setup; use the full sweep for a number."
    ),
}  # fmt: skip


@dataclass(frozen=True)
class CBSPlan:
    """What a ``pergrad cbs`` run measures.

    Attributes:
        batch_sizes: the sweep's ladder of B.
        lr_factors: learning rates per B, as multiples of :func:`grid_lr`.
        seeds: seeds per (B, lr): config.seed, config.seed + 1, ... (initial weights and batch
            order; every job keeps the reference's data and split, so that the target loss
            means the same thing in all of them).
        branch_points: how many reference checkpoints to branch from.
        branch_factors: the k of the branches (k = 1 first).
        tolerance: relative loss tolerance of a branch.
        truth_points: steps of the reference run where the closed-form B_noise is evaluated
            (linear regression only).
        target_loss: the validation loss to reach; None: the reference run's at half its steps.
        second_target: a second, easier target (higher loss), where B_crit is measured too (the
            S/E trade-off moves with the target); None: the reference run's loss at a quarter
            of its steps. Sweep jobs run to the harder target and note when they cross both.
        quick: the smaller plan of ``--quick`` (its cbs.json carries :data:`QUICK_CHECK`).
    """

    batch_sizes: tuple[int, ...]
    lr_factors: tuple[float, ...]
    seeds: int
    branch_points: int
    branch_factors: tuple[int, ...]
    tolerance: float = TOLERANCE
    target_loss: float | None = None
    truth_points: int = 24
    second_target: float | None = None
    quick: bool = False

    @property
    def n_jobs(self) -> int:
        sweep = len(self.batch_sizes) * len(self.lr_factors) * self.seeds
        return sweep + self.branch_points * len(self.branch_factors)


def make_plan(
    config: TrainConfig,
    *,
    quick: bool = False,
    seeds: int | None = None,
    target_loss: float | None = None,
    tolerance: float = TOLERANCE,
    second_target: float | None = None,
) -> CBSPlan:
    """The default plan for a config: batch sizes the powers of two from 8 up to half the
    training set (every other one when quick), branches at k·B for powers of two k up to the same.
    Quick keeps the three learning rates per B (a coarser grid biases B_crit low: large
    batches are under-tuned) and drops seeds, batch sizes and branch points instead.

    Raises:
        ConfigError: ``batch_size = "auto"``, fewer than two seeds, a target loss ≤ 0, a
            negative tolerance, a training set too small for a ladder, or a batch size of the
            ladder that does not split into ``config.accumulate`` micro-batches.
    """
    if config.auto:
        raise ConfigError("pergrad cbs sweeps fixed batch sizes: give --batch-size the reference run's B, not auto")
    if seeds is not None and seeds < 2:
        raise ConfigError(f"--seeds must be at least 2 (the interval of B_crit needs replicates), got {seeds}")
    if target_loss is not None and not (math.isfinite(target_loss) and target_loss > 0):
        raise ConfigError(f"--target-loss must be a positive number, got {target_loss}")
    if second_target is not None and not (math.isfinite(second_target) and second_target > 0):
        raise ConfigError(f"--second-target-loss must be a positive number, got {second_target}")
    if second_target is not None and target_loss is not None and not second_target > target_loss:
        raise ConfigError(
            f"--second-target-loss ({second_target:g}) must be above --target-loss ({target_loss:g}): "
            "it is the easier target"
        )
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ConfigError(f"--tolerance must be a number >= 0, got {tolerance}")
    n_train = load_dataset(config).train_x.shape[0]
    top = 2 ** int(math.log2(n_train // 2)) if n_train >= 16 else 0
    ladder = [b for b in (2**p for p in range(3, 20)) if b <= top]
    if quick:
        ladder = ladder[::2]
    if len(ladder) < 3:
        raise ConfigError(
            f"the training set has {n_train} examples: too few for a ladder of batch sizes; use a larger dataset"
        )
    factors = [k for k in (2**p for p in range(0, 12)) if k * config.batch_size <= top]
    if quick:
        factors = factors[::2]
    for b in ladder + [k * config.batch_size for k in factors]:
        config.replace(batch_size=b)  # ConfigError when b does not split into the micro-batches
    return CBSPlan(
        batch_sizes=tuple(ladder),
        lr_factors=_LR_FACTORS,
        seeds=seeds or (2 if quick else 3),
        branch_points=2 if quick else 4,
        branch_factors=tuple(factors),
        tolerance=tolerance,
        target_loss=target_loss,
        truth_points=8 if quick else 24,
        second_target=second_target,
        quick=quick,
    )


def scaled_lr(config: TrainConfig, batch_size: int) -> float:
    """The reference lr moved to another batch size by the optimizer's rule (the branches' lr):
    linearly for SGD, by the square root for Adam."""
    k = batch_size / config.batch_size
    return config.lr * (math.sqrt(k) if config.optimizer == "adam" else k)


def grid_lr(config: TrainConfig, batch_size: int) -> float:
    """The centre of the sweep's learning-rate grid at a batch size: :func:`scaled_lr` below the
    reference batch, and above it the square-root rule, since the linear one overshoots the
    stable learning rate once the noise no longer dominates."""
    if batch_size <= config.batch_size:
        return scaled_lr(config, batch_size)
    return config.lr * math.sqrt(batch_size / config.batch_size)


def branch_critical_batch(batch_sizes, losses, tolerance: float) -> tuple[float, bool]:
    """B*: the largest batch size up to which every branch's loss is within the tolerance.

    Args:
        batch_sizes: (k,) increasing batch sizes, the first the base branch's.
        losses: (k,) each branch's loss after the same number of examples.
        tolerance: a branch passes when its loss ≤ (1 + tolerance) × the base branch's loss.

    Returns:
        (B*, bounded): B* and whether a larger branch failed (else B* is only a lower bound).
        A failure ends the search, so a lucky branch beyond it does not count; a non-finite
        loss fails.

    References:
        Merrill et al. 2025, arXiv:2505.23971.
    """
    base = losses[0]
    best = batch_sizes[0]
    for b, loss in zip(batch_sizes[1:], losses[1:], strict=True):
        if not (math.isfinite(loss) and loss <= (1 + tolerance) * base):
            return float(best), True
        best = b
    return float(best), False


# --- jobs -------------------------------------------------------------------------------------


class _Stop(Exception):
    """Raised from the trainer's row callback to end a sweep job early."""


def run_job(job: dict) -> dict:
    """Run one job (a dict: kind "sweep" or "branch", name, config, ...) and write its JSON.

    Returns:
        The job's result (also in ``job["result_path"]``, written atomically).
    """
    torch.set_num_threads(1)
    start = time.time()
    config = TrainConfig.from_dict(job["config"])
    shutil.rmtree(config.out, ignore_errors=True)  # an unfinished earlier attempt
    result = _sweep_job(job, config) if job["kind"] == "sweep" else _branch_job(job, config)
    result = {**{k: job[k] for k in ("kind", "name", "batch_size", "lr", "seed")}, **result}
    result["wall_s"] = time.time() - start
    write_atomic(job["result_path"], json.dumps(result, indent=1) + "\n")
    return result


def _sweep_job(job: dict, config: TrainConfig) -> dict:
    """Train until the validation loss first reaches the (hardest) target; the step of each
    target's crossing is interpolated linearly between the two logged rows around it.

    The result's ``reached``, ``steps``, ``examples`` are the first target's; ``at_targets``
    holds them for every target of ``job["targets"]``."""
    targets, seen = job["targets"], []

    def on_row(row: dict) -> None:
        loss = row[Column.VAL_LOSS]
        seen.append((row[Column.STEP], loss))
        if loss <= min(targets) or not math.isfinite(loss) or loss > 2 * seen[0][1]:
            raise _Stop

    try:
        train(config, quiet=True, stop_after=job["max_steps"], on_row=on_row, stream=io.StringIO())
    except _Stop:
        pass
    at_targets = [_crossing(seen, target, job["mean_batch"]) for target in targets]
    last = seen[-1][1] if seen else math.inf
    return {**at_targets[0], "at_targets": at_targets, "last_val_loss": _finite(last)}


def _crossing(seen: list[tuple[int, float]], target: float, mean_batch: float) -> dict:
    """Steps and examples to the first logged row at or below ``target``, interpolated linearly
    from the row before."""
    k = next((i for i, (_, loss) in enumerate(seen) if loss <= target), None)
    if k is None:
        return {"target": target, "reached": False, "steps": None, "examples": None}
    step, loss = seen[k]
    steps = float(step)
    if k > 0 and seen[k - 1][1] > loss:
        before_step, before_loss = seen[k - 1]
        steps -= (step - before_step) * (target - loss) / (before_loss - loss)
    return {"target": target, "reached": True, "steps": steps, "examples": steps * mean_batch}


def _branch_job(job: dict, config: TrainConfig) -> dict:
    """Continue the reference checkpoint at this batch size and lr for the branch's steps.

    The trainer writes a fresh checkpoint of the branch's own run (its format), whose model and
    optimizer are replaced by the reference's, with the optimizer's lr set to the branch's.
    """
    train(config, quiet=True, stop_after=0, stream=io.StringIO())
    path = Path(config.out) / "checkpoint.pt"
    state, point = load_checkpoint(path), load_checkpoint(job["point"])
    optimizer = point["optimizer"]
    for group in optimizer["param_groups"]:
        group["lr"] = config.lr
    save_checkpoint(path, {**state, "model": point["model"], "optimizer": optimizer})
    result = train(config, resume=True, quiet=True, stop_after=job["steps"], stream=io.StringIO())
    loss = result.rows[-1][Column.VAL_LOSS] if result.rows else math.inf
    return {"point": job["at_step"], "steps": job["steps"], "examples": job["steps"] * config.batch_size,
            "val_loss": _finite(loss)}  # fmt: skip


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


# --- the reference run ------------------------------------------------------------------------


def _reference(config: TrainConfig, plan: CBSPlan, out: Path) -> dict:
    """Train the reference run in ``out`` (pausing at the branch points to keep their
    checkpoints; resume is exact, so it is the uninterrupted run), then fix the target loss and
    the reference's steps to it. Read back from ``cbs/reference.json`` when already done."""
    path = out / "cbs" / "reference.json"
    if path.is_file():
        return json.loads(path.read_text())
    points_dir = out / "cbs" / "points"
    points_dir.mkdir(parents=True, exist_ok=True)
    dataset = load_dataset(config)
    total = BatchOrder.for_run(config, dataset).steps_per_epoch() * config.epochs
    points = sorted({max(1, round(total * (j + 1) / (plan.branch_points + 1))) for j in range(plan.branch_points)})
    for j, at in enumerate(points):
        train(config, resume=j > 0, quiet=True, stop_after=at, stream=io.StringIO())
        write_atomic(points_dir / f"step-{at}.pt", (out / "checkpoint.pt").read_bytes())
    result = train(config, resume=True, quiet=True, stream=io.StringIO())
    rows = read_metrics(out / "metrics.csv")

    def loss_at(fraction: float) -> float:
        return min(rows, key=lambda r: abs(r[Column.STEP] - result.step * fraction))[Column.VAL_LOSS]

    target = plan.target_loss if plan.target_loss is not None else loss_at(0.5)
    second = plan.second_target if plan.second_target is not None else loss_at(0.25)
    targets = [target] + ([second] if second > target else [])
    crossings = [next((r for r in rows if r[Column.VAL_LOSS] <= t), None) for t in targets]
    if crossings[0] is None:
        raise ConfigError(
            f"the reference run never reached the target validation loss {target:g} "
            f"(best {min(r[Column.VAL_LOSS] for r in rows):.4g}): choose a larger --target-loss or train longer"
        )
    crossing = crossings[0]
    reference = {
        "target_loss": target,
        "targets": targets,
        "steps_to_target": crossing[Column.STEP],
        "total_steps": result.step,
        "points": points,
        "b_simple": {k: crossing.get(k) for k in (Column.B_SIMPLE, Column.B_SIMPLE_LOW, Column.B_SIMPLE_HIGH)},
        "b_simple_step": crossing[Column.STEP],
        "predictors": [_predictors(r) for r in crossings],
    }
    write_atomic(path, json.dumps(reference, indent=1) + "\n")
    return reference


def _predictors(row: dict) -> dict:
    """B_simple and (under Adam) B_P with their intervals, from a reference row."""
    return {
        "step": row[Column.STEP],
        "b_simple": row.get(Column.B_SIMPLE),
        "b_simple_interval": [row.get(Column.B_SIMPLE_LOW), row.get(Column.B_SIMPLE_HIGH)],
        "b_precond": row.get(Column.B_PRECOND),
        "b_precond_interval": [row.get(Column.B_PRECOND_LOW), row.get(Column.B_PRECOND_HIGH)],
    }


# --- planning the jobs ------------------------------------------------------------------------


def _jobs(config: TrainConfig, plan: CBSPlan, out: Path, reference: dict) -> list[dict]:
    """Every job of the plan, sweep first (longest first), then the branches."""
    dataset = load_dataset(config)
    jobs_dir = out / "cbs" / "jobs"
    s_ref = reference["steps_to_target"]
    jobs = []
    for b in sorted(plan.batch_sizes):
        order = BatchOrder(dataset.train_x.shape[0], b, config.seed)
        sizes = [len(x) for x in order.batches(0)]
        max_steps = math.ceil(_BUDGET * s_ref * max(1.0, config.batch_size / b))
        for factor in plan.lr_factors:
            lr = grid_lr(config, b) * factor
            for seed in range(config.seed, config.seed + plan.seeds):
                name = f"sweep-b{b}-lr{lr:.6g}-seed{seed}"
                run = config.replace(
                    batch_size=b, lr=lr, seed=seed, data_seed=config.dataset_seed, out=str(jobs_dir / name),
                    log_every=max(1, int(max_steps / (_BUDGET * _ROWS))), epochs=math.ceil(max_steps / len(sizes)) + 1,
                )  # fmt: skip
                jobs.append({"kind": "sweep", "name": name, "batch_size": b, "lr": lr, "seed": seed,
                             "config": run.to_dict(), "targets": reference["targets"], "max_steps": max_steps,
                             "mean_batch": sum(sizes) / len(sizes)})  # fmt: skip
    examples = _BRANCH_STEPS * config.batch_size * max(plan.branch_factors)
    for at in reference["points"]:
        for k in plan.branch_factors:
            b, name = k * config.batch_size, f"branch-t{at}-k{k}"
            steps = math.ceil(examples / b)
            run = config.replace(batch_size=b, lr=scaled_lr(config, b), out=str(jobs_dir / name), log_every=steps,
                                 epochs=math.ceil(steps * b / dataset.train_x.shape[0]) + 2)  # fmt: skip
            jobs.append({"kind": "branch", "name": name, "batch_size": b, "lr": run.lr, "seed": config.seed,
                         "config": run.to_dict(), "point": str(out / "cbs" / "points" / f"step-{at}.pt"),
                         "at_step": at, "steps": steps})  # fmt: skip
    jobs.sort(key=lambda j: -j.get("max_steps", j.get("steps")))  # the longest first: the pool ends together
    for job in jobs:
        job["result_path"] = str(jobs_dir / f"{job['name']}.json")
    return jobs


# --- running them -----------------------------------------------------------------------------


def run_cbs(config: TrainConfig, plan: CBSPlan, *, workers: int = 1, stream=None) -> dict:
    """Measure the critical batch size as ``plan`` says, into the run directory ``config.out``.

    Args:
        config: the reference run's settings (``pergrad train``'s).
        plan: from :func:`make_plan`.
        workers: parallel processes for the jobs (1: in this process, one after another).
        stream: where progress goes (default stderr).

    Returns:
        The content of ``cbs.json`` (also written there, atomically).

    Raises:
        ConfigError: unusable settings, or a reference run that never reaches the target.
    """
    stream = stream or sys.stderr
    out = prepare_run_dir(config.out)
    saved = out / "cbs" / "plan.json"
    record = json.loads(json.dumps(_plan_record(config, plan)))  # tuples as lists, as read back
    if saved.is_file() and json.loads(saved.read_text()) != record:
        raise ConfigError(
            f"{out} holds a cbs run with other settings: choose another --out, or repeat the same settings to resume"
        )
    (out / "cbs" / "jobs").mkdir(parents=True, exist_ok=True)
    write_atomic(saved, json.dumps(record, indent=1) + "\n")
    print(f"pergrad cbs: reference run ({config.batch_size} per step, {config.epochs} epochs) in {out}",
          file=stream, flush=True)  # fmt: skip
    reference = _reference(config, plan, out)
    jobs = _jobs(config, plan, out, reference)
    done = [j for j in jobs if Path(j["result_path"]).is_file()]
    pending = [j for j in jobs if not Path(j["result_path"]).is_file()]
    print(f"pergrad cbs: target validation loss {reference['target_loss']:.4g}; {len(jobs)} jobs, "
          f"{len(done)} already done, {workers} in parallel", file=stream, flush=True)  # fmt: skip
    _run_all(pending, workers, len(done), len(jobs), stream)
    results = [json.loads(Path(j["result_path"]).read_text()) for j in jobs]
    summary = _summarize(config, plan, reference, results, out)
    write_atomic(out / RESULT, json.dumps(jsonable(summary), indent=1) + "\n")
    return summary


def _plan_record(config: TrainConfig, plan: CBSPlan) -> dict:
    return {"config": {**config.to_dict(), "out": None}, "plan": plan.__dict__}


def _run_all(jobs: list[dict], workers: int, done: int, total: int, stream) -> None:
    """Run the jobs, ``workers`` at a time, printing one progress line per finished job."""
    started = time.time()

    def report(result: dict) -> None:
        nonlocal done
        done += 1
        if result["kind"] == "branch":
            what = "diverged" if result["val_loss"] is None else f"validation loss {result['val_loss']:.4g}"
        else:
            what = f"{result['steps']:.1f} steps" if result["reached"] else "target not reached"
        print(f"[{done}/{total}] {result['name']}: {what} ({time.time() - started:.0f} s)", file=stream, flush=True)

    if workers == 1:
        for job in jobs:
            report(run_job(job))
        return
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context)
    try:
        running = {pool.submit(run_job, job) for job in jobs}
        while running:
            finished, running = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                report(future.result())
    except BaseException:  # an interruption: start no further job; finished ones are saved
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


def default_workers() -> int:
    """The cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# --- the result -------------------------------------------------------------------------------


def _summarize(config: TrainConfig, plan: CBSPlan, reference: dict, results: list[dict], out: Path) -> dict:
    """The content of cbs.json from the finished jobs (see :func:`run_cbs`): B_crit at each
    target, the noise scales at the reference's crossing of it, the branches. The top-level
    ``b_crit``, ``b_simple``, ``b_precond``... are those of the first target."""
    sweep = [r for r in results if r["kind"] == "sweep"]
    predictors = reference.get("predictors") or [
        _predictors({Column.STEP: reference["b_simple_step"], **reference["b_simple"]})
    ]
    at_targets = []
    for i, target in enumerate(reference.get("targets", [reference["target_loss"]])):
        measured = _measure(sweep, plan.seeds, i)
        at_targets.append({"target_loss": target, **measured, **predictors[i]})
        for name in ("b_simple", "b_precond"):
            at_targets[-1][f"ratio_{name}"] = _ratio(at_targets[-1], name)
    first = at_targets[0]
    summary = {
        "target_loss": reference["target_loss"],
        "batch_size": config.batch_size,
        "optimizer": config.optimizer,
        "tolerance": plan.tolerance,
        **{k: v for k, v in first.items() if k != "target_loss"},
        "b_simple_step": first["step"],
        "ratio": first["ratio_b_simple"][0],
        "ratio_interval": first["ratio_b_simple"][1],
        "at_targets": at_targets,
        "sweep": sweep,
    }
    summary["branches"] = _branches(config, plan, results)
    if plan.quick:
        summary["quick_check"] = QUICK_CHECK
    if config.dataset == "linreg" and config.model == "linear":
        summary["ground_truth"] = _ground_truth(config, plan, reference, out)
    return summary


def _measure(sweep: list[dict], seeds: int, i: int) -> dict:
    """B_crit at the i-th target, with an interval that reflects the learning-rate grid.

    Per B, the learning rates whose seeds all reached the target are ranked by their mean
    steps. The fit on the best per B gives B_crit and its seed bootstrap interval
    (``b_crit_seed_interval``). The grid is coarse: the tuned optimum lies between grid points,
    and a fit on a grid neighbour is as plausible a reading of the data. So ``b_crit_interval``
    is the hull of that seed interval, of the seed interval of the fit on the second-best lr at
    every B, and of the point fits that take the second-best at any subset of the batch sizes
    (``b_crit_grid_range``). A B whose best lr is at the grid's edge is listed in ``lr_at_edge``:
    its optimum may lie outside the grid.
    """
    ranked = _ranked(sweep, seeds, i)
    best = {b: cells[0] for b, cells in ranked.items()}
    second = {b: cells[1] if len(cells) > 1 else cells[0] for b, cells in ranked.items()}
    lrs = {b: sorted({r["lr"] for r in sweep if r["batch_size"] == b}) for b in ranked}
    measured: dict[str, Any] = {
        "b_crit": None, "b_crit_interval": None, "b_crit_bounded": None, "b_crit_seed_interval": None,
        "b_crit_grid_range": None, "s_min": None, "e_min": None,
        "best_lr": {str(b): lr for b, (lr, _) in best.items()},
        "second_lr": {str(b): lr for b, (lr, _) in second.items()},
        "lr_at_edge": [b for b, (lr, _) in best.items() if len(lrs[b]) > 2 and lr in (lrs[b][0], lrs[b][-1])],
        "points": [p for _, points in best.values() for p in points],
    }  # fmt: skip
    if len(best) < 2:
        return measured
    fit = _fit_points(measured["points"])
    fit_second = _fit_points([p for _, points in second.values() for p in points])
    choices = list(ranked)
    flips = [c for c in choices if len(ranked[c]) > 1][:10]  # at most 2^10 point fits
    grid = [fit.b_crit, fit_second.b_crit]
    for mask in range(1, 2 ** len(flips)):
        pick = {b: (second if b in flips and mask >> flips.index(b) & 1 else best)[b] for b in choices}
        grid.append(_fit_points([p for _, points in pick.values() for p in points]).b_crit)
    ends = [fit.b_crit, *(fit.interval or ()), *(fit_second.interval or ()), *grid]
    interval = [min(ends), max(ends)]
    measured.update(b_crit=fit.b_crit, b_crit_interval=interval, b_crit_bounded=math.isfinite(interval[1]),
                    b_crit_seed_interval=list(fit.interval) if fit.interval else None,
                    b_crit_grid_range=[min(grid), max(grid)], s_min=fit.s_min, e_min=fit.e_min,
                    confidence=fit.confidence, residuals=fit.residuals.tolist())  # fmt: skip
    return measured


def _fit_points(points: list[dict]):
    steps, examples, seeds = ([p[k] for p in points] for k in ("steps", "examples", "seed"))
    return fit_tradeoff(steps, examples, seeds=seeds)


def _ranked(sweep: list[dict], seeds: int, i: int) -> dict[int, list[tuple[float, list[dict]]]]:
    """{B: [(lr, its points at target i)], fewest mean steps first}, over the lrs whose seeds
    all reached target i; batch sizes with none are left out."""
    ranked = {}
    for b in sorted({r["batch_size"] for r in sweep}):
        by_lr: dict[float, list[dict]] = {}
        for r in sweep:
            if r["batch_size"] == b:
                at = r["at_targets"][i] if "at_targets" in r else r
                by_lr.setdefault(r["lr"], []).append({"batch_size": b, "lr": r["lr"], "seed": r["seed"], **{
                    k: at[k] for k in ("reached", "steps", "examples")}})  # fmt: skip
        complete = {lr: ps for lr, ps in by_lr.items() if len(ps) == seeds and all(p["reached"] for p in ps)}
        if complete:
            order = sorted(complete, key=lambda lr: np.mean([p["steps"] for p in complete[lr]]))
            ranked[b] = [(lr, [{k: p[k] for k in ("batch_size", "lr", "seed", "steps", "examples")}
                               for p in complete[lr]]) for lr in order]  # fmt: skip
    return ranked


def _ratio(measured: dict, name: str) -> tuple[float | None, list | None]:
    """B_simple / B_crit (or B_P / B_crit), with the interval from the two intervals' ends
    (conservative)."""
    predicted, b_crit = measured.get(name), measured["b_crit"]
    if predicted is None or b_crit is None or not (0 < b_crit < math.inf):
        return None, None
    ratio = predicted / b_crit
    low_s, high_s = (math.inf if v is None else v for v in measured[f"{name}_interval"])
    if measured["b_crit_interval"] is None:
        return ratio, None
    low_c, high_c = measured["b_crit_interval"]
    return ratio, [low_s / high_c if high_c > 0 else 0.0, high_s / low_c if low_c > 0 else math.inf]


def _branches(config: TrainConfig, plan: CBSPlan, results: list[dict]) -> list[dict]:
    """B*(t) at each branch point, with every branch's loss."""
    rows = []
    for at in sorted({r["point"] for r in results if r["kind"] == "branch"}):
        branch = [r for r in results if r["kind"] == "branch" and r["point"] == at]
        branch.sort(key=lambda r: r["batch_size"])
        sizes = [r["batch_size"] for r in branch]
        losses = [math.inf if r["val_loss"] is None else r["val_loss"] for r in branch]
        b_star, bounded = branch_critical_batch(sizes, losses, plan.tolerance)
        rows.append({"step": at, "b_star": b_star, "bounded": bounded, "batch_sizes": sizes, "val_losses": losses,
                     "examples": branch[0]["examples"]})  # fmt: skip
    return rows


def _ground_truth(config: TrainConfig, plan: CBSPlan, reference: dict, out: Path) -> dict:
    """B_noise = tr(HΣ)/(GᵀHG) and B_simple in closed form along the reference run.

    The run is replayed (resume is exact, so it is the same run) in ``cbs/replay``, pausing at
    ``plan.truth_points`` steps, half of them evenly spaced up to the step where it reached the
    target (the last), half over the whole run; the closed form is evaluated at the parameters
    of each pause. Read back when already done.
    """
    path = out / "cbs" / "ground_truth.json"
    if path.is_file():
        return json.loads(path.read_text(), parse_constant=float)
    replay = config.replace(out=str(out / "cbs" / "replay"))
    total, target = reference["total_steps"], reference["steps_to_target"]
    half = max(1, plan.truth_points // 2)  # half of the points up to the target, half over the run
    steps = sorted({max(1, round(end * j / half)) for end in (target, total) for j in range(1, half + 1)})
    rows = []
    for j, at in enumerate(steps):
        train(replay, resume=j > 0, quiet=True, stop_after=at, stream=io.StringIO())
        model = load_checkpoint(Path(replay.out) / "checkpoint.pt")["model"]
        b_noise, b_simple = linreg_noise_scales(config, model["weight"].reshape(-1), model["bias"].reshape(()))
        rows.append({"step": at, "b_noise": b_noise, "b_simple": b_simple})
    shutil.rmtree(replay.out)
    up_to_target = [r["b_noise"] for r in rows if r["step"] <= target]
    truth = {
        "along_run": rows,
        "steps_to_target": target,
        "b_noise_at_target": next(r["b_noise"] for r in rows if r["step"] == target),
        "b_noise_median_to_target": float(np.median(up_to_target)),
    }
    write_atomic(path, json.dumps(jsonable(truth), indent=1) + "\n")
    return truth
