"""A Lightning fit with pergrad's callback, shared by tests/test_integration_lightning.py and its
2-process DDP run (``torchrun --nproc-per-node 2 tests/lightning_worker.py OUT``).

The module is an ordinary LightningModule (mean loss from ``training_step``); it only records,
for the test, each micro-batch it trained on and the weights at each step's start.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
from lightning.fabric.utilities.warnings import PossibleUserWarning
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pergrad.integrations.lightning import PergradCallback

N, D, C = 32, 5, 3



class Classifier(pl.LightningModule):
    def __init__(self, accumulate: int):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, C))
        self.accumulate = accumulate
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []  # micro-batches, in order
        self.weights: list[dict[str, torch.Tensor]] = []  # at each step's start

    def on_train_batch_start(self, batch, batch_idx):
        # recorded here, not in training_step, which PergradCallback's check runs again on single examples
        x, y = batch
        if batch_idx % self.accumulate == 0:
            self.weights.append({k: v.detach().clone() for k, v in self.named_parameters()})
        self.seen.append((x.detach().clone(), y.detach().clone()))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2)


def data() -> TensorDataset:
    """Labels from a linear rule with some flipped: a gradient signal beside the noise."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, D, generator=g) * 2
    y = (x @ torch.randn(D, C, generator=g)).argmax(1)
    flip = torch.rand(N, generator=g) < 0.1
    return TensorDataset(x, torch.where(flip, torch.randint(0, C, (N,), generator=g), y))


def fit(out: Path, *, accumulate: int = 1, batch_size: int = 4, precision="64-true", strategy="auto",
        devices=1, beta: float = 0.9, module: Classifier | None = None,
        **options) -> tuple[Classifier, PergradCallback, pl.Trainer]:  # fmt: skip
    """Fit 1 epoch on ``data()`` without shuffling (``module``, default a new ``Classifier``); the
    callback (``options`` passed to it) writes ``out/run``."""
    module = Classifier(accumulate) if module is None else module
    callback = PergradCallback(beta=beta, run_dir=out / "run", **options)
    trainer = pl.Trainer(
        max_epochs=1, accelerator="cpu", devices=devices, strategy=strategy, precision=precision,
        accumulate_grad_batches=accumulate, callbacks=[callback], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(out),
    )  # fmt: skip
    with warnings.catch_warnings():
        # Lightning's advice for real runs (more dataloader workers, ...) does not apply here
        warnings.filterwarnings("ignore", category=PossibleUserWarning)
        trainer.fit(module, DataLoader(data(), batch_size=batch_size, shuffle=False))
    return module, callback, trainer


if __name__ == "__main__":  # one worker of the DDP run
    out = Path(sys.argv[1])
    module, callback, trainer = fit(out, accumulate=2, strategy="ddp", devices=2)
    rank = trainer.global_rank
    torch.save({"seen": module.seen, "weights": module.weights}, out / f"rank{rank}.pt")
    if rank == 0:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        (out / "metrics.json").write_text(json.dumps(metrics))
