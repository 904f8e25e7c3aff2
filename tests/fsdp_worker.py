"""One worker of the FSDP2 tests (``torchrun --nproc-per-node 2 tests/fsdp_worker.py OUT``, gloo on CPU):
tests/fsdp_models.TinyLM sharded with ``fully_shard`` per block and at the root, float64. Each scenario
saves what rank r measured (``OUT/rank{r}.pt``); tests/test_fsdp.py compares it with one process."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import fsdp_models as fm
import pergrad


def sharded(dtype=torch.float64, mp: MixedPrecisionPolicy | None = None, frozen_pos: bool = False):
    model = fm.model(dtype)
    model.pos.requires_grad_(not frozen_pos)
    kwargs = {} if mp is None else {"mp_policy": mp}
    for block in model.blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def per_example(rank: int, on_unsupported: str) -> dict:
    """PerExample, mean reduction, two backward passes (verify on both): rank r takes examples 4r..4r+3.
    Under "fallback" the position table is frozen: the model itself, a fully_shard unit, cannot go
    through torch.func (Gain inside the blocks does)."""
    model = sharded(frozen_pos=on_unsupported == "fallback")
    idx, y = fm.data()
    mine = slice(4 * rank, 4 * rank + 4)
    out = {}
    with pergrad.PerExample(model, grads=True, second_moment=True, on_unsupported=on_unsupported, verify=True) as pe:
        for step in range(2):
            model.zero_grad(set_to_none=True)
            r = pe.backward(fm.losses(model, idx[mine], y[mine]))
            rows = {k: (v.start, v.stop) for k, v in pe._sharding.rows.items()}
            out[step] = {
                "param_sq_norms": r.param_sq_norms,
                "batch_grad_sq_norm": r.batch_grad_sq_norm,
                "grads": r.grads,
                "rows": rows,
                "second_moment": {k: full(v) for k, v in r.second_moment.items()},
                "grad": {k: full(p.grad) for k, p in model.named_parameters() if p.grad is not None},
                "paths": pe.paths,
            }
            with torch.no_grad():  # a step, so that the second backward runs at other weights
                for p in model.parameters():
                    if p.grad is not None:
                        p -= 0.1 * p.grad
    return out


def fallback_root(rank: int) -> str:
    """The message that refuses torch.func on the model itself, a fully_shard unit."""
    try:
        pergrad.PerExample(sharded(), on_unsupported="fallback")
    except pergrad.errors.UnsupportedModuleError as err:
        return str(err)
    return ""


def distributed_step(rank: int) -> dict:
    """DistributedPerExample over micro-batches of unequal sizes: rank 0 takes examples 0..4 in two
    micro-batches, rank 1 examples 5..7 in two."""
    model = sharded()
    idx, y = fm.data()
    parts = [[0, 1, 2], [3, 4]] if rank == 0 else [[5], [6, 7]]
    with pergrad.DistributedPerExample(model, second_moment=True) as dpe:
        norms = [dpe.backward(fm.losses(model, idx[p], y[p])).sq_norms for p in parts]
        step = dpe.step(sums=torch.tensor([1.0]))
    est = step.estimate()
    return {
        "sq_norms": pergrad.distributed.all_gather_cat(torch.cat(norms)),
        "n": step.n,
        "sq_norm_sums": step.sq_norm_sums,
        "grad_sq_norms": step.grad_sq_norms,
        "trace_sigma": est.trace_sigma,
        "grad_sq_norm": est.grad_sq_norm,
        "second_moment": {k: full(v) for k, v in step.second_moment.items()},
        "mean_grads": {k: full(v) for k, v in step.mean_grads.items()},
        "grad": {k: full(p.grad) for k, p in model.named_parameters()},
        "micro_batches": step.micro_batches,
        "two_batch": tuple(step.two_batch_estimate()),
        "sums": step.sums,
    }


def mixed_precision(rank: int) -> dict:
    """bf16 parameters in the forward and backward (MixedPrecisionPolicy), float32 sharded parameters."""
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model = sharded(torch.float32, mp)
    idx, y = fm.data()
    mine = slice(4 * rank, 4 * rank + 4)
    with pergrad.PerExample(model, second_moment=True, verify=True) as pe:
        r = pe.backward(fm.losses(model, idx[mine], y[mine]))
    return {"param_sq_norms": r.param_sq_norms, "second_moment": {k: full(v) for k, v in r.second_moment.items()}}


if __name__ == "__main__":
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        saved = {
            "rules": per_example(rank, "auto"),
            "fallback": per_example(rank, "fallback"),
            "fallback_root": fallback_root(rank),
            "step": distributed_step(rank),
            "mixed": mixed_precision(rank),
        }
        torch.save(saved, out / f"rank{rank}.pt")
    finally:
        pergrad.distributed.shutdown()
