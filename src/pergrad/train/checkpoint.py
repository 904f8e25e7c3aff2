"""Checkpoints: everything needed to continue a run exactly, written atomically."""

from __future__ import annotations

import io
from pathlib import Path

import torch

from .._atomic import write_atomic

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "FORMAT"]

FORMAT = "pergrad-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or not pergrad's."""


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Write ``state`` (tensors, numbers, dicts) with a format tag, atomically."""
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buffer)
    write_atomic(path, buffer.getvalue())


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises:
        CheckpointError: the file is missing, unreadable, or not a pergrad checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: resume from a run directory that pergrad train wrote")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds for a damaged file
        raise CheckpointError(
            f"{path} is corrupt or not a checkpoint ({type(err).__name__}); start a new run or restore the file"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a pergrad checkpoint (format {FORMAT}); start a new run")
    return state
