"""Run a test worker script on two gloo processes under torchrun and read what each rank saved."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch


def run_two_workers(script: str, out: Path) -> list[dict]:
    """``torchrun --nproc-per-node=2 tests/<script> <out>``; each rank saves ``out/rank{r}.pt``.

    Returns the two ranks' saved dicts; fails the test with the end of stderr if torchrun fails.
    """
    here = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here), *sys.path])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               str(here / script), str(out)]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def run_example(name: str) -> str:
    """Run ``examples/NAME`` on 2 workers under torchrun (gloo on CPU); returns its stdout."""
    example = Path(__file__).parent.parent / "examples" / name
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(example)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout
