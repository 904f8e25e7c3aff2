"""One worker of a 2-process Hugging Face Trainer run with PergradCallback under torchrun
(``torchrun --nproc-per-node 2 tests/hf_worker.py OUT``, gloo on CPU; micro-batches of 3, so that
each worker's 12 examples of an epoch make whole steps of 2), for
tests/test_integration_transformers.py: it saves the micro-batches it trained on, the weights at
each step's start, and (rank 0) the logged history."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from test_integration_transformers import train

if __name__ == "__main__":
    out = Path(sys.argv[1])
    trainer, callback, weights, seen = train(out, accumulate=2, batch_size=3, max_grad_norm=0.05, ddp_backend="gloo")
    rank = trainer.args.process_index
    torch.save({"seen": seen, "weights": weights}, out / f"rank{rank}.pt")
    if rank == 0:
        (out / "log_history.json").write_text(json.dumps(trainer.state.log_history))
