"""One worker of a 2-process Lightning fit under ``ModelParallelStrategy`` (FSDP2, gloo on CPU) with
pergrad's callback (``torchrun --nproc-per-node 2 tests/lightning_fsdp_worker.py OUT [MODE]``), for
tests/test_fsdp_callbacks.py: the module of tests/lightning_worker.py with each Linear and the root
sharded by ``fully_shard`` in ``configure_model``; it saves the micro-batches it trained on, the whole
weights at each step's start and (rank 0) the logged metrics. MODE: "first" (default) or "false", the
callback's ``verify``; "rolled" or "halved", the first Linear given a wrong rule of tests/test_verify.py
(pieces given to the wrong examples; pieces that do not add up), when each rank saves the
VerificationError's message instead; "adam" trains with Adam (B_P logged), "adam-ddp" the same module
unsharded under the DDP strategy."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard

import pergrad
from lightning_worker import Classifier, fit
from pergrad.rules import _registry


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
            whole = {k: v.detach() for k, v in self.named_parameters()}
            self.weights.append({k: v.full_tensor() if hasattr(v, "full_tensor") else v.clone()
                                 for k, v in whole.items()})  # fmt: skip
        self.seen.append((x.detach().clone(), y.detach().clone()))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return super().training_step((x.double(), y), batch_idx)


class AdamClassifier(ShardedClassifier):
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)


class AdamDDP(AdamClassifier):
    def configure_model(self):
        self.double()


def wrong_rule(out: Path, rule) -> None:
    """Fit with the first Linear under ``rule``; save the error each rank raised."""
    from test_verify import RolledLinear

    _registry._RULES[RolledLinear] = rule
    module = ShardedClassifier(2)
    first = RolledLinear(module.net[0].in_features, module.net[0].out_features)
    first.load_state_dict(module.net[0].state_dict())
    module.net[0] = first
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    try:
        fit(out, accumulate=2, strategy=strategy, devices=2, precision="32-true", module=module)
        error = None
    except pergrad.VerificationError as e:
        error = str(e)
    rank = module.global_rank
    torch.save({"error": error, "steps": module.trainer.global_step}, out / f"rank{rank}.pt")


if __name__ == "__main__":
    out = Path(sys.argv[1])
    mode = sys.argv[2] if len(sys.argv) > 2 else "first"
    if mode in ("rolled", "halved"):
        from test_verify import HalvedRule, RolledRule

        wrong_rule(out, RolledRule() if mode == "rolled" else HalvedRule())
        sys.exit()
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    module = {"adam": AdamClassifier, "adam-ddp": AdamDDP}.get(mode, ShardedClassifier)(2)
    if mode == "adam-ddp":
        strategy = "ddp"
    verify = False if mode == "false" else "first"
    module, callback, trainer = fit(out, accumulate=2, strategy=strategy, devices=2, precision="32-true",
                                    module=module, verify=verify)  # fmt: skip
    rank = trainer.global_rank
    torch.save({"seen": module.seen, "weights": module.weights}, out / f"rank{rank}.pt")
    if rank == 0:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        (out / "metrics.json").write_text(json.dumps(metrics))
