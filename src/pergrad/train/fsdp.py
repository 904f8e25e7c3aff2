"""``pergrad train --fsdp``: the built-in models sharded with FSDP2, and their sharded checkpoints.

Each child of the model that holds parameters becomes one ``fully_shard`` unit, then the model
itself (the root), so every parameter, gradient and optimizer state is split by rows over the
workers. The weights and the optimizer state are saved with ``torch.distributed.checkpoint`` (DCP):
each rank writes its shards into ``RUN_DIR/sharded/<k>``, and a run resumes from them on any number
of workers (DCP reshards on load). ``checkpoint.pt`` keeps the rest (position, statistics, RNG) and
names the directory, and is written last, so a run killed while saving resumes from the previous one.
"""

from __future__ import annotations

import shutil
import warnings
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard

from ..distributed import StepResult
from ..sharded import is_sharded

__all__ = ["SHARDED_DIR", "load_sharded", "load_whole_model", "prune_sharded", "save_sharded", "shard_model", "whole"]

SHARDED_DIR = "sharded"


def shard_model(model: nn.Module) -> nn.Module:
    """``fully_shard`` on every child that holds parameters, then on the model; returns the model."""
    for child in model.children():
        if any(True for _ in child.parameters()):
            fully_shard(child)
    fully_shard(model)
    return model


def save_sharded(run_dir: Path, index: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> str:
    """Every rank writes its shards of the model and optimizer into ``run_dir/sharded/<index>``
    (collective); returns that directory's name relative to ``run_dir``."""
    name = f"{SHARDED_DIR}/{index}"
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(run_dir / name))
    return name


def load_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load the shards saved by :func:`save_sharded` (on any number of ranks) into the sharded
    ``model`` and ``optimizer`` (collective)."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def load_whole_model(path: Path, model: nn.Module) -> None:
    """Load the model weights saved by :func:`save_sharded` into an unsharded ``model``, in one
    process, without a process group (the report's)."""
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path), no_dist=True)
    model.load_state_dict(state["model"])


def prune_sharded(run_dir: Path, keep: str) -> None:
    """Rank 0, once ``checkpoint.pt`` names ``keep``: remove the older shard directories."""
    for old in (run_dir / SHARDED_DIR).iterdir():
        if f"{SHARDED_DIR}/{old.name}" != keep:
            shutil.rmtree(old, ignore_errors=True)


def whole(step: StepResult) -> StepResult:
    """The step with its mean gradients and second moments gathered whole on every rank (collective):
    the trainer's elementwise SNR state and its gradient sketch are kept whole, as without sharding,
    so that a sharded run logs what a data-parallel one does. (The built-in models are small; the
    library's own results stay sharded.)"""

    return replace(step, mean_grads=whole_tensors(step.mean_grads), second_moment=whole_tensors(step.second_moment))


def whole_tensors(tensors: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    """{name: tensor} with each sharded one gathered whole (collective); None stays None."""
    return None if tensors is None else {k: v.full_tensor() if is_sharded(v) else v for k, v in tensors.items()}


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
