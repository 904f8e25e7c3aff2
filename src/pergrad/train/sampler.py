"""The batch order of a run: which examples each step sees, resumable at any step.

A shuffled epoch is a permutation drawn from a generator seeded by (seed, epoch), so epoch e's
batches never depend on how the run got there. A batch is the next B examples of the epoch's
permutation, whatever B is at that step, so a batch size that changes during an epoch (``--batch-size
auto``) still draws every example exactly once per epoch, without replacement; resuming needs only
(epoch, examples taken so far in it).

Data-parallel workers share each global batch as torch's ``DistributedSampler`` shares an epoch
(rank r takes every W-th example, starting at r), and each splits its share into K consecutive
micro-batches. The global batches are therefore the same whatever the number of workers W and of
micro-batches K: a run is the same run on 1 or 8 workers (up to the rounding of the sums), and a
checkpoint resumes on a different number of workers. Sharding each batch rather than the epoch
also shares the epoch's last, smaller batch among the workers instead of padding or dropping it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor

__all__ = ["BatchOrder", "sizes_by_step"]


class BatchOrder:
    """Batches of example indices for each epoch.

    Args:
        num_examples: N, the size of the training set.
        batch_size: B, the size of the batches of :meth:`batches` (a batch size that changes
            from step to step passes its sizes instead).
        seed: seeds the permutations.
        order: "shuffled" (a fresh uniform permutation per epoch) or "sorted" (by ``labels``,
            the same every epoch: consecutive batches are correlated).
        labels: (N,) labels, needed for "sorted".
    """

    def __init__(
        self, num_examples: int, batch_size: int, seed: int, order: str = "shuffled", labels: Tensor | None = None
    ):
        if order == "sorted" and labels is None:
            raise ValueError("order='sorted' sorts by label, and this dataset has none: use order='shuffled'.")
        self.num_examples, self.batch_size, self.seed, self.order = num_examples, batch_size, seed, order
        self._sorted = None if labels is None else torch.argsort(labels, stable=True)
        self._last: tuple[int, Tensor] | None = None  # (epoch, permutation): take() reuses it

    @classmethod
    def for_run(cls, config, dataset) -> BatchOrder:
        """The batch order of a run: a ``TrainConfig``'s batch size (its first, for ``auto``),
        seed and order over a ``Dataset``'s training split (its labels for "sorted")."""
        return cls(dataset.train_x.shape[0], config.first_batch_size, config.seed, config.order, dataset.labels)

    def permutation(self, epoch: int) -> Tensor:
        """(N,) the order of the examples in an epoch."""
        if self.order == "sorted":
            return self._sorted
        if self._last is None or self._last[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._last = (epoch, torch.randperm(self.num_examples, generator=gen))
        return self._last[1]

    def take(self, epoch: int, start: int, size: int) -> Tensor:
        """The batch at position ``start`` of the epoch's permutation: its next ``size`` indices.

        The last batch of an epoch holds what remains (fewer than ``size``); a single example
        that would be left over joins the batch before it (one example has no variance).

        Args:
            epoch: the epoch.
            start: examples of the epoch already taken, 0 ≤ start < N.
            size: B ≥ 2.

        Returns:
            (b,) indices, b = min(size, N − start), or size + 1 when N − start = size + 1.
        """
        end = start + size
        if self.num_examples - end < 2:
            end = self.num_examples
        return self.permutation(epoch)[start:end]

    def batches(self, epoch: int, sizes: Iterable[int] | None = None) -> list[Tensor]:
        """The epoch's batches of indices, in order (see :meth:`take`).

        Args:
            epoch: the epoch.
            sizes: the size of each batch in turn (a schedule that changes B); by default B
                for every batch. It must not run out before the epoch does.
        """
        sizes = iter(sizes) if sizes is not None else itertools.repeat(self.batch_size)
        batches, start = [], 0
        while start < self.num_examples:
            size = next(sizes, None)
            if size is None:
                raise ValueError(
                    f"the batch sizes ran out after {len(batches)} batches, {start} of {self.num_examples} examples"
                )
            batches.append(self.take(epoch, start, size))
            start += batches[-1].numel()
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


def sizes_by_step(changes: Sequence[tuple[int, int]]) -> Iterator[int]:
    """B at steps 0, 1, 2, … (without end) from the batch sizes a run used.

    Args:
        changes: (first step, B) at the start and at each change, by increasing step; the
            first at step 0 (a checkpoint's ``batch_sizes``).
    """
    for (start, size), (end, _) in zip(changes, changes[1:], strict=False):
        yield from itertools.repeat(size, end - start)
    yield from itertools.repeat(changes[-1][1])
