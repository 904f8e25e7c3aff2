"""Your own DistributedDataParallel loop with pergrad: the global batch's gradient noise scale.

Run with any number of workers (gloo on CPU, NCCL on GPU):

    torchrun --nproc_per_node 2 examples/ddp_noise_scale.py

Each worker takes its share of every epoch from a DistributedSampler, runs ACCUMULATE
micro-batches per step inside ``ddp.no_sync()``, and ``DistributedPerExample.step`` merges the
gradients and per-example statistics of all workers: every rank then holds the mean gradient of
the global batch of WORKERS × ACCUMULATE × MICRO examples, and the same statistics.
"""

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import pergrad

ACCUMULATE = 2  # micro-batches per worker and step
MICRO = 16  # examples per micro-batch
EPOCHS = 3


def main() -> None:
    device = pergrad.distributed.init_from_env()  # gloo on CPU, NCCL with one GPU per worker
    rank, world = pergrad.distributed.rank_and_world()

    torch.manual_seed(0)  # the same data and initial weights on every worker
    x = torch.randn(1024, 20)
    y = (x[:, :5].sum(1) > 0).long()
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.Tanh(), torch.nn.Linear(64, 2)).to(device)
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    noise = pergrad.NoiseScale(beta=0.9)
    two_batch = pergrad.NoiseScale(beta=0.9)

    sampler = DistributedSampler(TensorDataset(x, y), shuffle=True, seed=0, drop_last=True)
    loader = DataLoader(TensorDataset(x, y), batch_size=MICRO, sampler=sampler, drop_last=True)
    with pergrad.DistributedPerExample(model) as dpe:
        for epoch in range(EPOCHS):
            sampler.set_epoch(epoch)  # a fresh shuffle each epoch, the same on every worker
            micro_batches = list(loader)
            for start in range(0, len(micro_batches) - ACCUMULATE + 1, ACCUMULATE):
                optimizer.zero_grad(set_to_none=True)
                for xb, yb in micro_batches[start : start + ACCUMULATE]:
                    with ddp.no_sync():  # pergrad all-reduces the gradient once per step
                        losses = F.cross_entropy(ddp(xb.to(device)), yb.to(device), reduction="none")
                        dpe.backward(losses)  # (MICRO,) losses, summed into .grad
                step = dpe.step()  # p.grad: the mean gradient of the global batch
                optimizer.step()
                noise.update_estimate(step.estimate(), step.names)  # per-example estimator
                two = step.two_batch_estimate()  # micro-batches against the global batch
                if two is not None:
                    two_batch.update_estimate(two)
            if rank == 0:
                print(
                    f"epoch {epoch}: global batch {step.n} on {world} worker(s), "
                    f"B_simple {noise.b_simple:.1f} (per-example), {two_batch.b_simple:.1f} (two-batch)",
                    flush=True,
                )
    pergrad.distributed.shutdown()


if __name__ == "__main__":
    main()
