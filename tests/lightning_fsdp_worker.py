"""One worker of a 2-process Lightning fit under ``ModelParallelStrategy`` (FSDP2, gloo on CPU) with
pergrad's callback (``torchrun --nproc-per-node 2 tests/lightning_fsdp_worker.py OUT [VERIFY]``), for
tests/test_integration_lightning.py: the module of tests/lightning_worker.py with each Linear and the
root sharded by ``fully_shard`` in ``configure_model``; it saves the micro-batches it trained on, the
whole weights at each step's start and (rank 0) the logged metrics."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard

from lightning_worker import Classifier, fit


class ShardedClassifier(Classifier):
    """Float64 by hand: ModelParallelStrategy refuses precision="64-true" (it runs under "32-true",
    which leaves the module's dtype as it is)."""

    def configure_model(self):
        self.double()
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)

    def on_train_batch_start(self, batch, batch_idx):
        x, y = batch
        if batch_idx % self.accumulate == 0:  # whole weights: a gather on every rank
            self.weights.append({k: v.detach().full_tensor() for k, v in self.named_parameters()})
        self.seen.append((x.detach().clone(), y.detach().clone()))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return super().training_step((x.double(), y), batch_idx)


if __name__ == "__main__":
    out = Path(sys.argv[1])
    verify = {"first": "first", "false": False}[sys.argv[2] if len(sys.argv) > 2 else "first"]
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    module, callback, trainer = fit(out, accumulate=2, strategy=strategy, devices=2, precision="32-true",
                                    module=ShardedClassifier(2), verify=verify)  # fmt: skip
    rank = trainer.global_rank
    torch.save({"seen": module.seen, "weights": module.weights}, out / f"rank{rank}.pt")
    if rank == 0:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        (out / "metrics.json").write_text(json.dumps(metrics))
