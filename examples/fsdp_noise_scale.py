"""Your own FSDP2 loop with pergrad: the global batch's gradient noise scale of a sharded model.

Run with any number of workers (gloo on CPU, NCCL on GPU):

    torchrun --nproc_per_node 2 examples/fsdp_noise_scale.py

The model is sharded with ``fully_shard`` per block and at the root. Each worker runs ACCUMULATE
micro-batches per step; FSDP2 reduce-scatters every backward's gradient, pergrad measures each
example's gradient norm from the layers' inputs and output gradients (no extra gathering), and
``DistributedPerExample.step`` merges the statistics of all workers, so every rank holds the same
estimate. ``.grad`` is FSDP2's sharded gradient, the mean over the global batch.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import pergrad

ACCUMULATE = 2  # micro-batches per worker and step
MICRO = 16  # examples per micro-batch
EPOCHS = 3


def main() -> None:
    device = pergrad.distributed.init_from_env()
    rank, world = pergrad.distributed.rank_and_world()

    torch.manual_seed(0)  # the same data and initial weights on every worker
    x = torch.randn(1024, 20)
    y = (x[:, :5].sum(1) > 0).long()
    model = nn.Sequential(
        nn.Sequential(nn.Linear(20, 64), nn.LayerNorm(64), nn.Tanh()),
        nn.Sequential(nn.Linear(64, 64), nn.Tanh()),
        nn.Linear(64, 2),
    ).to(device)
    for block in model:
        fully_shard(block)
    fully_shard(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    noise = pergrad.NoiseScale(beta=0.9)

    sampler = DistributedSampler(TensorDataset(x, y), shuffle=True, seed=0, drop_last=True)
    loader = DataLoader(TensorDataset(x, y), batch_size=MICRO, sampler=sampler, drop_last=True)
    with pergrad.DistributedPerExample(model) as dpe:
        for epoch in range(EPOCHS):
            sampler.set_epoch(epoch)
            batches = iter(loader)
            for _ in range(len(loader) // ACCUMULATE):
                optimizer.zero_grad(set_to_none=True)
                for _ in range(ACCUMULATE):
                    xb, yb = next(batches)
                    dpe.backward(F.cross_entropy(model(xb.to(device)), yb.to(device), reduction="none"))
                step = dpe.step()  # p.grad: FSDP2's shard of the global batch's mean gradient
                optimizer.step()
                noise.update_estimate(step.estimate(), step.names)
            if rank == 0:
                print(f"epoch {epoch}: global batch {step.n} on {world} worker(s), B_simple ≈ {noise.b_simple:.1f}")
    pergrad.distributed.shutdown()


if __name__ == "__main__":
    main()
