"""The batch order of a run: which examples each step sees, resumable at any step.

A shuffled epoch is a permutation drawn from a generator seeded by (seed, epoch), so epoch e's
batches never depend on how the run got there: resuming needs only (epoch, batch index).

Data-parallel workers share each global batch as torch's ``DistributedSampler`` shares an epoch
(rank r takes every W-th example, starting at r), and each splits its share into K consecutive
micro-batches. The global batches are therefore the same whatever the number of workers W and of
micro-batches K: a run is the same run on 1 or 8 workers (up to the rounding of the sums), and a
checkpoint resumes on a different number of workers. Sharding each batch rather than the epoch
also shares the epoch's last, smaller batch among the workers instead of padding or dropping it.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["BatchOrder"]


class BatchOrder:
    """Batches of example indices for each epoch.

    Args:
        num_examples: N, the size of the training set.
        batch_size: B; the last batch of an epoch may be smaller (it is dropped when it
            would hold a single example, which has no variance).
        seed: seeds the permutations.
        order: "shuffled" (a fresh uniform permutation per epoch) or "sorted" (by ``labels``,
            the same every epoch: consecutive batches are correlated).
        labels: (N,) labels, needed for "sorted".
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int, order: str = "shuffled", labels: Tensor | None = None):
        if order == "sorted" and labels is None:
            raise ValueError("order='sorted' sorts by label, and this dataset has none: use order='shuffled'.")
        self.num_examples, self.batch_size, self.seed, self.order = num_examples, batch_size, seed, order
        self._sorted = None if labels is None else torch.argsort(labels, stable=True)

    @classmethod
    def for_run(cls, config, dataset) -> "BatchOrder":
        """The batch order of a run: a ``TrainConfig``'s batch size, seed and order over a
        ``Dataset``'s training split (its labels for "sorted")."""
        return cls(dataset.train_x.shape[0], config.batch_size, config.seed, config.order, dataset.labels)

    def permutation(self, epoch: int) -> Tensor:
        """(N,) the order of the examples in an epoch."""
        if self.order == "sorted":
            return self._sorted
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_examples, generator=gen)

    def batches(self, epoch: int) -> list[Tensor]:
        """The epoch's batches of indices, in order."""
        batches = list(self.permutation(epoch).split(self.batch_size))
        if len(batches) > 1 and batches[-1].numel() < 2:
            batches.pop()
        return batches

    def steps_per_epoch(self) -> int:
        return len(self.batches(0))

    @staticmethod
    def micro_batches(batch: Tensor, rank: int, world: int, accumulate: int) -> list[Tensor]:
        """Worker ``rank``'s ``accumulate`` micro-batches of a global batch of indices.

        Args:
            batch: (B,) the global batch.
            rank, world: this worker and the number of workers W.
            accumulate: K.

        Returns:
            K index tensors, (B / (W·K),) each when W·K divides B; in a smaller last batch
            their sizes differ by at most one and may be 0. Over all ranks and micro-batches,
            every index of ``batch`` appears exactly once.
        """
        return list(batch[rank::world].tensor_split(accumulate))
