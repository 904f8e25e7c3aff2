"""``pergrad train --fsdp``: the built-in model sharded with FSDP2 over 2 gloo workers (torchrun).

A sharded run logs what one process logs up to rounding; killed and restarted by torchrun it
resumes from its torch.distributed.checkpoint shards bit for bit; stopped, it resumes on one worker.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pergrad.train.config import TrainConfig
from pergrad.train.loop import train
from pergrad.train.metrics import read_metrics

TINY = dict(dataset="linreg", model="mlp", epochs=1, log_every=5, batch_size=32, accumulate=2)
INJECTION = Path(__file__).parent / "fault_injection"  # its sitecustomize.py kills rank 1 after a step


def _train(out: Path, *extra: str, die_at: int | None = None) -> subprocess.CompletedProcess:
    path = [str(INJECTION)] if die_at is not None else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (*path, os.environ.get("PYTHONPATH")) if p)}
    if die_at is not None:
        env["PERGRAD_TEST_DIE_AT_STEP"] = str(die_at)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    command = [sys.executable, "-m", "pergrad", "train", "--quiet", "--out", str(out), *flags, *extra]
    if "--resume" in extra:
        command = [sys.executable, "-m", "pergrad", "train", "--quiet", *extra]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp") / "straight"
    done = _train(out, "--nproc", "2", "--fsdp")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "report:" in done.stdout
    return out


def _assert_close_rows(actual: list[dict], expected: list[dict], rel: float, skip=()) -> None:
    assert len(actual) == len(expected)
    for a, b in zip(actual, expected):
        assert a.keys() == b.keys()
        for k in a.keys() - set(skip):
            if a[k] is None or b[k] is None:
                assert a[k] == b[k], k
            else:
                # a cosine near 0 (nearly orthogonal float32 gradients) is compared absolutely
                absolute = 1e-6 if k == "grad_cosine" else 1e-12
                assert a[k] == pytest.approx(b[k], rel=rel, abs=absolute), (a["step"], k)


@pytest.mark.slow
def test_a_sharded_run_logs_what_one_process_logs(straight, tmp_path):
    one = train(TrainConfig(out=str(tmp_path / "one"), **TINY), quiet=True)
    # float32 sums in another order; the two-batch estimate compares micro-batches, of 8 examples
    # here (2 workers x 2) and of 16 in one process
    _assert_close_rows(read_metrics(straight / "metrics.csv"), one.rows, rel=1e-5, skip=["b_simple_two_batch"])
    assert (straight / "sharded").is_dir() and (straight / "report.html").exists()


@pytest.mark.slow
def test_a_killed_sharded_worker_is_restarted_and_resumes_bit_for_bit(straight, tmp_path):
    """torchrun restarts both workers after rank 1 dies at step 12; they load the step-10 shards."""
    done = _train(tmp_path / "run", "--nproc", "2", "--fsdp", "--max-restarts", "1", die_at=12)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "exitcode: 17" in done.stderr  # the injected death happened
    assert read_metrics(tmp_path / "run" / "metrics.csv") == read_metrics(straight / "metrics.csv")  # bit for bit
    assert len(list((tmp_path / "run" / "sharded").iterdir())) == 1  # older shards pruned


@pytest.mark.slow
def test_a_sharded_checkpoint_resumes_on_another_number_of_workers(straight, tmp_path):
    """Killed at step 12 without restarts, the 2-worker run resumes from its step-10 shards on 1 worker."""
    died = _train(tmp_path / "run", "--nproc", "2", "--fsdp", die_at=12)
    assert died.returncode != 0
    done = _train(tmp_path / "run", "--resume", str(tmp_path / "run"), "--nproc", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = read_metrics(tmp_path / "run" / "metrics.csv")
    _assert_close_rows(resumed, read_metrics(straight / "metrics.csv"), rel=1e-5, skip=["b_simple_two_batch"])
