"""The callbacks under FSDP2 (``fully_shard``) on 2 gloo processes (CPU), float64: Lightning's
``ModelParallelStrategy`` and the Hugging Face Trainer on a model that transformers sharded at load
time (``from_pretrained(..., distributed_config=DistributedConfig(fsdp_size=2))``). Each run's logged
statistics (B_simple with its interval, tr Σ, |G|², norm quantiles, SNR per parameter) are compared,
step by step, with pergrad by hand in one unsharded process on each step's global batch at the
weights the step started from (tests/test_integration_lightning.py and
tests/test_integration_transformers.py, which compare their DDP runs with the same references).

accelerate's FSDP2 plugin (``fsdp_config={"fsdp_version": 2}``) is not among them: accelerate turns
FSDP on for GPU-like devices only, and on CPU the Trainer runs DDP instead (see docs/frameworks.md).
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from pergrad.distributed import _check_equal_batches
from pergrad.train.metrics import Column, read_metrics
from test_integration_lightning import assert_rows_match, by_hand, micro_batches_by_step
from test_integration_transformers import REL as HF_REL
from test_integration_transformers import _by_hand as hf_by_hand
from workers import run_two_workers


@pytest.mark.slow
def test_lightning_model_parallel_strategy_logs_the_statistics_of_one_process(tmp_path):
    ranks = run_two_workers("lightning_fsdp_worker.py", tmp_path)
    for w0, w1 in zip(ranks[0]["weights"], ranks[1]["weights"], strict=True):
        assert all(torch.equal(w0[k], w1[k]) for k in w0)
    steps = [s0 + s1 for s0, s1 in zip(*(micro_batches_by_step(r["seen"], 2) for r in ranks), strict=True)]
    expected = by_hand(ranks[0]["weights"], steps)
    assert len(expected) == 2 and expected[0][Column.BATCH_SIZE] == 16  # 2 ranks x 2 micro-batches x 4
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert_rows_match(rows, expected, rel=1e-10)
    logged = json.loads((tmp_path / "metrics.json").read_text())  # through pl_module.log (float32)
    assert logged["pergrad/b_simple"] == pytest.approx(rows[-1][Column.B_SIMPLE], rel=1e-6)


@pytest.mark.slow
def test_lightning_model_parallel_strategy_logs_adams_noise_scale_as_ddp_does(tmp_path):
    """Under Adam, B_P = tr(PΣ)/GᵀPG with Adam's P, sharded like the parameters, equals the DDP run's."""
    run_two_workers("lightning_fsdp_worker.py", tmp_path / "fsdp", "adam")
    run_two_workers("lightning_fsdp_worker.py", tmp_path / "ddp", "adam-ddp")
    sharded, ddp = (read_metrics(tmp_path / kind / "run" / "metrics.csv") for kind in ("fsdp", "ddp"))
    assert len(sharded) == len(ddp) == 2
    assert ddp[0][Column.B_PRECOND] is None and ddp[1][Column.B_PRECOND] is not None  # no Adam state at step 1
    for got, want in zip(sharded, ddp, strict=True):
        for key, value in want.items():
            if isinstance(value, float):
                assert got[key] == pytest.approx(value, rel=1e-10, abs=1e-12), key


ROLLED = r"per-example gradient of 'net\.0\.(weight|bias)' \(FSDPRolledLinear at 'net\.0', rule RolledRule\) is wrong"
HALVED = r"the per-example pieces of 'net\.0\.(weight|bias)' .* do not add up"


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "message"), [("rolled", ROLLED), ("halved", HALVED)])
def test_lightning_model_parallel_strategy_checks_the_first_step(tmp_path, mode, message):
    """The callback's first-step check under FSDP2, on every rank: a rule that gives each example its
    neighbour's gradient fails the single-example check; one whose pieces do not add up fails the
    sums check (gradients of the rank's loss read before the reduce-scatter)."""
    ranks = run_two_workers("lightning_fsdp_worker.py", tmp_path, mode)
    for rank in ranks:
        assert rank["error"] is not None and re.search(message, rank["error"]), rank["error"]
        assert rank["steps"] == 0
    assert not (tmp_path / "run" / "metrics.csv").exists()


@pytest.mark.slow
def test_transformers_trainer_on_a_model_sharded_at_load_time_logs_the_statistics_of_one_process(tmp_path):
    ranks = run_two_workers("hf_fsdp_worker.py", tmp_path)
    by_rank = [[r["seen"][i : i + 2] for i in range(0, len(r["seen"]), 2)] for r in ranks]
    steps = [a + b for a, b in zip(*by_rank, strict=True)]  # the global batch: both ranks' micro-batches
    expected = hf_by_hand(ranks[0]["weights"], steps)
    logs = [h for h in json.loads((tmp_path / "log_history.json").read_text()) if "loss" in h]
    assert len(logs) == len(expected) == 3
    assert all(log["grad_norm"] > 0.05 for log in logs)  # every step clipped: the statistics are of ḡ before it
    for step, (log, want) in enumerate(zip(logs, expected, strict=True)):
        for key, value in want.items():
            assert log["pergrad/" + key] == pytest.approx(value, rel=HF_REL, abs=1e-7), f"step {step + 1}, {key}"


def test_merge_result_refuses_workers_with_batches_of_different_sizes():
    _check_equal_batches(12, 2 * 6.0**2, 2)  # 6 and 6
    differ = r"the 2 workers' batches of this step differ in size \(12 examples in all, not 6 each\)"
    with pytest.raises(ValueError, match=differ):
        _check_equal_batches(12, 5.0**2 + 7.0**2, 2)  # 5 and 7
