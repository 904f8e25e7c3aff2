"""Data-parallel training and gradient accumulation: 2 gloo processes on CPU against one process.

Workers are started with torch.multiprocessing (a FileStore rendezvous) or, for the command line
and the elastic restart, with ``pergrad train --nproc 2`` (torchrun).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import pergrad
from pergrad.cli.main import main
from pergrad.report import build_report
from pergrad.report._format import number
from pergrad.stats import ParamSNR, param_batch_estimates
from pergrad.train.checkpoint import load_checkpoint
from pergrad.train.config import ConfigError, TrainConfig
from pergrad.train.loop import train
from pergrad.train.metrics import read_metrics
from pergrad.train.sampler import BatchOrder
from workers import run_example

WORLD = 2
N = 12  # the global batch


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(N, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (N,), generator=gen)


def _losses(model, x, y) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y, reduction="none")


TINY = dict(dataset="linreg", model="linear", epochs=1, log_every=5, batch_size=32)  # 52 steps
AUTO = {**TINY, "batch_size": "auto", "min_batch_size": 8, "max_batch_size": 64}  # 89 steps, B changes 3 times
MEASURED = {**TINY, "measure_every": 3, "accumulate": 2, "log_every": 2}  # steps 0, 3, 6, … measured


@pytest.fixture(scope="module")
def spawned(tmp_path_factory) -> Path:
    """Every 2-worker scenario in one start of WORLD gloo processes (a start costs seconds)."""
    out = tmp_path_factory.mktemp("spawned")
    mp.spawn(_worker, args=(str(out),), nprocs=WORLD, join=True)
    return out


def _worker(rank: int, out: str) -> None:
    out = Path(out)
    dist.init_process_group("gloo", store=dist.FileStore(str(out / "store"), WORLD), rank=rank, world_size=WORLD)
    try:
        for accumulate in (1, 3):
            _step_on_workers(rank, out / f"step_k{accumulate}.pt", accumulate)
        train(TrainConfig(out=str(out / "full"), **TINY), quiet=True)
        train(TrainConfig(out=str(out / "stopped"), **TINY), quiet=True, stop_after=22)
        train(TrainConfig(out=str(out / "auto"), **AUTO), quiet=True)
        train(TrainConfig(out=str(out / "measured"), **MEASURED), quiet=True)
        train(TrainConfig(out=str(out / "measured_stopped"), **MEASURED), quiet=True, stop_after=17)
        try:
            train(TrainConfig(out=str(out / "mismatch"), **TINY, lr=0.05 * (1 + rank)), quiet=True)
        except ConfigError as err:
            (out / f"mismatch_{rank}.txt").write_text(str(err))
    finally:
        pergrad.distributed.shutdown()


def _step_on_workers(rank, out, accumulate):
    """Rank r takes examples r, r+2, ... of the batch, in ``accumulate`` micro-batches, through DDP."""
    model = _model()
    ddp = nn.parallel.DistributedDataParallel(model)
    x, y = _batch()
    sq_norms = []
    with pergrad.DistributedPerExample(model, second_moment=True) as dpe:
        for idx in torch.arange(rank, N, WORLD).tensor_split(accumulate):
            with ddp.no_sync():
                sq_norms.append(dpe.backward(_losses(ddp, x[idx], y[idx])).sq_norms)
        step = dpe.step(sums=torch.tensor([float(rank), 1.0]))
    gathered = pergrad.distributed.all_gather_cat(torch.cat(sq_norms))  # examples 0, 2, ..., then 1, 3, ...
    if rank == 0:
        order = torch.cat([torch.arange(r, N, WORLD) for r in range(WORLD)])
        torch.save({**_summary(step, model), "sq_norms": gathered[order.argsort()]}, out)


def _summary(step, model) -> dict:
    est = step.estimate()
    snr = ParamSNR(beta=1.0)
    snr.update_sums(step.second_moment, step.mean_grads, step.n)
    two = step.two_batch_estimate()
    return {
        "n": step.n,
        "grads": {k: p.grad.clone() for k, p in model.named_parameters()},
        "sq_norm_sums": step.sq_norm_sums,
        "trace_sigma": est.trace_sigma,
        "grad_sq_norm": est.grad_sq_norm,
        "second_moment": step.second_moment,
        "snr_signal": snr.state.signal,
        "snr_noise": snr.state.noise,
        "sums": step.sums,
        "micro_batches": step.micro_batches,
        "two_batch": None if two is None else tuple(two),
    }


def _reference() -> dict:
    """One process, the concatenated batch, one backward."""
    model = _model()
    x, y = _batch()
    with pergrad.PerExample(model, second_moment=True) as pe:
        result = pe.backward(_losses(model, x, y), reduction="mean")
    est = pergrad.stats.batch_estimate(result)
    per_param = param_batch_estimates(result)
    snr = ParamSNR(beta=1.0)
    snr.update(result)
    f64 = torch.float64
    return {
        "grads": {k: p.grad.clone() for k, p in model.named_parameters()},
        "sq_norms": result.sq_norms,
        "sq_norm_sums": torch.stack([result.sq_norms.sum(), *(s.sum() for s in result.param_sq_norms.values())]),
        "trace_sigma": torch.tensor([est.trace_sigma, *(e.trace_sigma for e in per_param.values())], dtype=f64),
        "grad_sq_norm": torch.tensor([est.grad_sq_norm, *(e.grad_sq_norm for e in per_param.values())], dtype=f64),
        "second_moment": result.second_moment,
        "snr_signal": snr.state.signal,
        "snr_noise": snr.state.noise,
        "grad_sq": result.batch_grad_sq_norm,
    }


def _rel_err(a, b) -> float:
    """max |a − b| / max |b| over tensors or dicts of tensors."""
    if isinstance(b, dict):
        return max(_rel_err(a[k], v) for k, v in b.items())
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).abs().max() / b.abs().max())


COMPARED = (
    "grads", "sq_norms", "sq_norm_sums", "trace_sigma", "grad_sq_norm", "second_moment", "snr_signal", "snr_noise"
)  # fmt: skip


@pytest.mark.parametrize("accumulate", [1, 3])
def test_two_workers_equal_one_process_on_the_concatenated_batch(spawned, accumulate):
    got, ref = torch.load(spawned / f"step_k{accumulate}.pt", weights_only=False), _reference()
    assert got["n"] == N and got["micro_batches"] == WORLD * accumulate
    errors = {key: _rel_err(got[key], ref[key]) for key in COMPARED}
    print(f"2 workers x {accumulate} micro-batches, max relative error:", errors)
    assert max(errors.values()) <= 1e-10, errors
    assert got["sums"].tolist() == [1.0, 2.0]  # the caller's sums, added over ranks
    assert got["two_batch"] is not None  # micro-batches of N / (2·K) against the global batch


def test_accumulation_in_one_process_equals_one_large_batch():
    model, (x, y), ref = _model(), _batch(), _reference()
    with pergrad.DistributedPerExample(model, second_moment=True) as dpe:
        for idx in torch.arange(N).tensor_split(4):
            dpe.backward(_losses(model, x[idx], y[idx]))
        step = dpe.step()
    got = _summary(step, model)
    errors = {key: _rel_err(got[key], ref[key]) for key in COMPARED if key != "sq_norms"}
    print("1 process x 4 micro-batches, max relative error:", errors)
    assert max(errors.values()) <= 1e-10, errors
    # micro-batches of 3 against the batch of 12: the two-batch estimator from its definition
    micro = []
    for idx in torch.arange(N).tensor_split(4):
        fresh = _model()
        fresh.zero_grad()
        _losses(fresh, x[idx], y[idx]).mean().backward()
        micro.append(sum(float(p.grad.square().sum()) for p in fresh.parameters()))
    expected = pergrad.stats.two_batch_estimate(sum(micro) / 4, float(ref["grad_sq"]), 3, N)
    assert got["two_batch"] == pytest.approx(tuple(expected), rel=1e-10)


def _close(a: list[dict], b: list[dict], keys, rel: float) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for row_a, row_b in zip(a, b):
        for key in keys:
            assert row_a[key] == pytest.approx(row_b[key], rel=rel), (key, row_a["step"])


KEYS = ("loss", "val_loss", "b_simple", "trace_sigma", "grad_sq_norm", "norm_q50", "norm_max", "snr/weight")


def test_two_workers_and_accumulation_follow_the_single_process_run(spawned, tmp_path):
    single = train(TrainConfig(out=str(tmp_path / "single"), **TINY), quiet=True).rows
    accumulated = train(TrainConfig(out=str(tmp_path / "k4"), **TINY, accumulate=4), quiet=True).rows
    workers = read_metrics(spawned / "full" / "metrics.csv")
    # the same global batches: equal up to float32 rounding of the sums' order
    _close(workers, single, KEYS, rel=1e-4)
    _close(accumulated, single, KEYS, rel=1e-4)
    assert "b_simple_two_batch" not in single[-1]
    for rows in (workers, accumulated):  # the two-batch estimate beside the per-example one
        assert rows[-1]["b_simple_two_batch"] > 0
        assert rows[-1]["b_simple_two_batch"] == pytest.approx(rows[-1]["b_simple"], rel=0.5)


def test_two_workers_and_accumulation_follow_the_single_process_auto_run(spawned, tmp_path, monkeypatch):
    """--batch-size auto: the same decisions, so the same batches; accumulation splits a batch
    into fewer micro-batches below the max, never larger ones."""
    single = train(TrainConfig(out=str(tmp_path / "single"), **AUTO), quiet=True).rows
    micro = []
    original = BatchOrder.micro_batches

    def spy(batch, rank, world, accumulate):
        parts = original(batch, rank, world, accumulate)
        micro.append([p.numel() for p in parts])
        return parts

    monkeypatch.setattr(BatchOrder, "micro_batches", staticmethod(spy))
    accumulated = train(TrainConfig(out=str(tmp_path / "k4"), **AUTO, accumulate=4), quiet=True).rows
    workers = read_metrics(spawned / "auto" / "metrics.csv")
    assert len({r["batch_size"] for r in single}) >= 3
    for rows in (workers, accumulated):
        assert [(r["batch_size"], r["examples"]) for r in rows] == [(r["batch_size"], r["examples"]) for r in single]
        _close(rows, single, KEYS + ("lr",), rel=1e-4)
    changes = load_checkpoint(tmp_path / "single" / "checkpoint.pt")["batch_sizes"]
    assert load_checkpoint(spawned / "auto" / "checkpoint.pt")["batch_sizes"] == changes
    assert max(max(sizes) for sizes in micro) <= 64 // 4  # max_batch_size / (workers x accumulate)
    assert all(len(sizes) == -(-4 * sum(sizes) // 64) for sizes in micro)  # ⌈K B / B_max⌉ micro-batches
    assert {len(sizes) for sizes in micro} >= {1, 3}  # 1 at B = 8, 3 at B = 45


def test_a_two_worker_checkpoint_resumes_on_one_worker(spawned, tmp_path):
    run = tmp_path / "stopped"
    shutil.copytree(spawned / "stopped", run)
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 22
    resumed = train(TrainConfig.load(run / "config.toml").replace(out=str(run)), resume=True, quiet=True)
    assert resumed.completed and resumed.step == 52
    _close(read_metrics(run / "metrics.csv"), read_metrics(spawned / "full" / "metrics.csv"), KEYS, rel=1e-4)


def test_two_workers_measuring_every_third_step_follow_the_single_process_run_and_resume(spawned, tmp_path):
    """measure_every=3 on 2 workers x 2 micro-batches: paused steps reduce the same gradient (the
    losses follow one process's); rows of 2 steps without a measured one (steps 5-6, 11-12, …) have
    the loss and empty statistics; a run stopped mid-window (step 17) and resumed on one worker
    ends with the same rows."""
    single = train(TrainConfig(out=str(tmp_path / "single"), **MEASURED), quiet=True).rows
    workers = read_metrics(spawned / "measured" / "metrics.csv")
    _close(workers, single, ("loss", "val_loss"), rel=1e-4)
    empty = [r["step"] for r in workers if r.get("b_simple") is None]
    assert empty == [s for s in range(2, 53, 2) if not any(t % 3 == 0 for t in (s - 2, s - 1))] == [6, 12, 18, 24, 30, 36, 42, 48]
    assert all(r["loss"] is not None and r.get("norm_q50") is None for r in workers if r["step"] in empty)
    _close([r for r in workers if r["step"] not in empty], [r for r in single if r["step"] not in empty], KEYS, rel=1e-4)
    run = tmp_path / "stopped"
    shutil.copytree(spawned / "measured_stopped", run)
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 17
    train(TrainConfig.load(run / "config.toml").replace(out=str(run)), resume=True, quiet=True)
    resumed = read_metrics(run / "metrics.csv")
    _close(resumed, workers, ("loss", "val_loss"), rel=1e-4)
    _close([r for r in resumed if r["step"] not in empty], [r for r in workers if r["step"] not in empty], KEYS, rel=1e-4)


def test_workers_with_different_settings_stop_with_a_clear_error(spawned):
    for rank in range(WORLD):
        message = (spawned / f"mismatch_{rank}.txt").read_text()
        assert "lr is 0.05 on rank 0 but 0.1 on rank 1" in message and "same flags" in message
    assert not (spawned / "mismatch" / "metrics.csv").exists()


def test_batch_size_must_split_into_workers_and_micro_batches():
    with pytest.raises(ConfigError, match="divisible by 5"):
        TrainConfig(batch_size=32, accumulate=5)
    with pytest.raises(ConfigError, match="divisible by 8"):
        TrainConfig(batch_size=36, accumulate=4).check_split(2)


@pytest.mark.slow
@pytest.mark.parametrize("settings, reference", [(TINY, "full"), (MEASURED, "measured")])
def test_a_killed_worker_is_restarted_and_the_run_resumes_with_nothing_lost(spawned, tmp_path, settings, reference):
    """torchrun restarts both workers after rank 1 dies at step 12; they resume from the last
    checkpoint (step 10). Also with measure_every=3, whose paused steps the resumed run repeats."""
    injection = Path(__file__).parent / "fault_injection"  # its sitecustomize.py kills rank 1 after step 12
    path = os.pathsep.join(p for p in (str(injection), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "PERGRAD_TEST_DIE_AT_STEP": "12"}
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]
    command = [sys.executable, "-m", "pergrad", "train", "--nproc", "2", "--max-restarts", "1", "--quiet"]
    command += ["--out", str(tmp_path / "run"), *flags]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "exitcode: 17" in done.stderr  # the injected death happened
    assert "report:" in done.stdout and (tmp_path / "run" / "report.html").exists()
    killed = read_metrics(tmp_path / "run" / "metrics.csv")
    straight = read_metrics(spawned / reference / "metrics.csv")
    assert killed == straight  # bit for bit


def test_report_shows_the_two_batch_estimate_beside_the_per_example_one(spawned, tmp_path):
    run = tmp_path / "full"
    shutil.copytree(spawned / "full", run)
    build_report(run)
    page, data = (run / "report.html").read_text(), json.loads((run / "report_data.json").read_text())
    noise = data["noise-scale"]
    assert noise["b_simple_two_batch_median"] > 0
    section = re.search(r'<section id="noise-scale">(.*?)</section>', page, re.S).group(1)
    assert "two-batch estimator" in section and number(noise["b_simple_two_batch_median"]) in section


@pytest.mark.slow
def test_the_readme_example_runs_under_torchrun():
    assert "epoch 2: global batch 64 on 2 worker(s)" in run_example("ddp_noise_scale.py")


def test_nproc_that_cannot_split_the_batch_stops_before_launching(tmp_path, capsys):
    assert main(["train", "--nproc", "3", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "does not split into 3 worker(s)" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()  # nothing was started or written
