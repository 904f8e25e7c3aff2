"""One worker of a 2-process Hugging Face Trainer run on a model that transformers sharded with FSDP2
at load time (``from_pretrained(..., distributed_config=DistributedConfig(fsdp_size=2))``, gloo on
CPU), with PergradCallback (``torchrun --nproc-per-node 2 tests/hf_fsdp_worker.py OUT``), for
tests/test_fsdp_callbacks.py: micro-batches of 3, 2 per step, clipped to a norm of 0.05 (below the
gradient's, so every step clips); it saves the micro-batches it trained on, the whole weights at each
step's start and (rank 0) the logged history."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import transformers as T_

from test_integration_transformers import _model, train

if __name__ == "__main__":
    out = Path(sys.argv[1])
    saved = out / f"tiny{os.environ['RANK']}"  # the same weights on each rank, saved apart: no process group yet
    _model().save_pretrained(saved)
    config = T_.DistributedConfig(fsdp_size=2)
    model = T_.GPT2LMHeadModel.from_pretrained(saved, distributed_config=config, dtype=torch.float64)
    model.loss_type = "ForCausalLM"
    assert all(hasattr(p, "full_tensor") for p in model.parameters())  # sharded: DTensors
    trainer, callback, weights, seen = train(out, accumulate=2, batch_size=3, max_grad_norm=0.05, model=model,
                                             ddp_backend="gloo")  # fmt: skip
    weights = [{k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in w.items()} for w in weights]
    rank = trainer.args.process_index
    torch.save({"seen": seen, "weights": weights}, out / f"rank{rank}.pt")
    if rank == 0:
        (out / "log_history.json").write_text(json.dumps(trainer.state.log_history))
