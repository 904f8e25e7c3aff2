"""Is the data order one epoch of random sampling, as mini-batch SGD assumes?

SGD's mini-batch gradient is an unbiased estimate of the full gradient, and successive
mini-batch gradients are (nearly) independent, only when every batch is a random draw from the
dataset. A sequential sampler, a label-sorted dataset, or an epoch that repeats or drops
examples breaks this without any error. ``check_sampling`` reads one epoch of *indices* (from a
DataLoader's sampler, without loading any data) and runs three checks:

1. **Order**: the number of ascents A (positions k with idx[k+1] > idx[k]) of the epoch's index
   sequence. For a uniformly random permutation of n indices, E[A] = (n−1)/2 and
   Var[A] = (n+1)/12 (Eulerian numbers); a sorted order gives A = n−1. Two-sided normal p-value.
2. **Label mix** (when labels are given): Pearson's chi-square test of homogeneity on the
   (batch × label) contingency table, expected counts = row total × column total / total
   (= batch size × dataset label frequency when the epoch is a permutation of the dataset),
   dof = (batches−1)(classes−1). Sampling without replacement makes the table multivariate
   hypergeometric, for which the Pearson statistic is asymptotically chi-square.
3. **Coverage** (when the dataset size N is known): each of the N examples appears exactly once.

:class:`pergrad.stats.GradientAlignment` is the training-time counterpart: it tests whether
consecutive mini-batch gradients are more aligned than non-consecutive ones.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import (
    DataLoader,
    DistributedSampler,
    RandomSampler,
    SequentialSampler,
    WeightedRandomSampler,
)

from ..stats.alignment import SHUFFLE_FIX as _FIX

__all__ = ["SamplingReport", "check_sampling"]


@dataclass(frozen=True)
class SamplingReport:
    """One epoch's sampling, tested against random sampling without replacement.

    Attributes:
        passed: p_value >= level, no repeated or missing examples, and not a SequentialSampler.
        p_value: smallest p-value of the tests run, Bonferroni-corrected (× tests run, capped at 1).
        level: the significance level used.
        num_batches: batches in the epoch.
        num_examples: indices drawn in the epoch (with repeats).
        dataset_size: N where known (len(labels) or len(loader.dataset)), else None.
        repeated: draws beyond the first of an index (total draws − distinct indices).
        missing: dataset indices never drawn (0 when N is unknown or the check does not apply).
        sequential_sampler: the loader uses torch's SequentialSampler.
        ascent_fraction: fraction of consecutive index pairs that increase (≈ 0.5 when shuffled).
        ascent_p_value: two-sided p-value of the ascent count (None when fewer than 3 indices).
        chi2_statistic: Pearson statistic of the batch × label table (None without labels).
        chi2_dof: its degrees of freedom (None without labels).
        chi2_p_value: its p-value (None without labels or with dof 0).
        coverage_checked: whether repeats/missing were held against passing (False for samplers
            that draw with replacement or a per-rank shard).
    """

    passed: bool
    p_value: float
    level: float
    num_batches: int
    num_examples: int
    dataset_size: int | None
    repeated: int
    missing: int
    sequential_sampler: bool
    ascent_fraction: float
    ascent_p_value: float | None
    chi2_statistic: float | None
    chi2_dof: int | None
    chi2_p_value: float | None
    coverage_checked: bool

    @property
    def explanation(self) -> str:
        head = (
            f"{self.num_batches} batches, {self.num_examples} examples; "
            f"{100 * self.ascent_fraction:.1f}% of consecutive indices increase (50% expected when shuffled)"
        )
        if self.chi2_statistic is not None:
            head += f"; label mix chi-square {self.chi2_statistic:.1f} on {self.chi2_dof} dof"
        head += f"; corrected p-value {self.p_value:.3g} (level {self.level:g})."
        if self.passed:
            return (
                f"Sampling looks random: {head} Mini-batch gradients are consistent with unbiased, "
                f"independent estimates of the full gradient."
            )
        problems = []
        if self.sequential_sampler:
            problems.append(
                "the DataLoader uses a SequentialSampler: the data are not shuffled, every epoch "
                "visits examples in the same stored order"
            )
        elif self.ascent_p_value is not None and self.ascent_p_value * self._num_tests < self.level:
            direction = "sorted" if self.ascent_fraction > 0.5 else "reverse-sorted or alternating"
            problems.append(f"the index order is {direction}, not a random permutation")
        if self.chi2_p_value is not None and self.chi2_p_value * self._num_tests < self.level:
            problems.append(
                "batches differ in their label mix far more than random batches would (label-sorted or clustered data)"
            )
        if self.coverage_checked and self.repeated:
            problems.append(f"{self.repeated} draws repeat an example already seen this epoch")
        if self.coverage_checked and self.missing:
            problems.append(f"{self.missing} of the {self.dataset_size} examples are never drawn")
        return (
            f"Sampling is NOT random: {'; '.join(problems)}. {head} Mini-batch gradients are then "
            f"correlated from step to step and are not unbiased estimates of the full gradient, "
            f"so noise-scale and SNR statistics computed from them are wrong too. {_FIX}"
        )

    @property
    def _num_tests(self) -> int:
        return max(1, (self.ascent_p_value is not None) + (self.chi2_p_value is not None))


def _as_index_list(batch) -> list[int]:
    return torch.as_tensor(batch).reshape(-1).tolist()


def _loader_epoch(loader: DataLoader) -> tuple[list[list[int]], bool, int | None, bool, int]:
    """Index batches of one epoch of ``loader``, without loading data.

    Returns (batches, is_sequential, dataset_size, coverage_applies, allowed_missing).
    """
    sampler = loader.sampler
    if loader.batch_sampler is not None:
        batches = [_as_index_list(b) for b in loader.batch_sampler]
        sampler = getattr(loader.batch_sampler, "sampler", sampler)
    else:  # batch_size=None: the sampler yields one example per step
        batches = [[int(i)] for i in sampler]
    try:
        n = len(loader.dataset)
    except TypeError:
        n = None
    with_replacement = isinstance(sampler, WeightedRandomSampler) or (
        isinstance(sampler, RandomSampler) and sampler.replacement
    )
    coverage = not with_replacement and not isinstance(sampler, DistributedSampler)
    allowed_missing = n % loader.batch_size if (loader.drop_last and n and loader.batch_size) else 0
    return batches, isinstance(sampler, SequentialSampler), n, coverage, allowed_missing


def _normal_two_sided(z: float) -> float:
    return math.erfc(abs(z) / math.sqrt(2.0))


def _chi2_sf(x: float, dof: int) -> float:
    try:
        from scipy.stats import chi2
    except ImportError:  # Wilson–Hilferty: (X/k)^(1/3) ≈ Normal(1 − 2/(9k), 2/(9k))
        v = 2.0 / (9.0 * dof)
        z = ((x / dof) ** (1.0 / 3.0) - (1.0 - v)) / math.sqrt(v)
        return 0.5 * math.erfc(z / math.sqrt(2.0))
    return float(chi2.sf(x, dof))


def check_sampling(
    batches: DataLoader | Iterable,
    labels: Tensor | None = None,
    *,
    level: float = 0.001,
) -> SamplingReport:
    """Test whether one epoch of mini-batches is a random permutation of the dataset.

    Args:
        batches: a ``torch.utils.data.DataLoader`` (its batch sampler is iterated once for
            one epoch of indices; no data are loaded), or an iterable over one epoch of index
            batches, each a tensor or list of dataset indices of shape (B,).
        labels: dataset labels, shape (N,), integer or any discrete values; enables the
            label-mix test and fixes N for the coverage test.
        level: significance level for the Bonferroni-corrected p-value.

    Returns:
        A ``SamplingReport``; ``report.explanation`` says in plain words what is wrong.

    Example:
        >>> loader = DataLoader(range(100), batch_size=10)  # shuffle=False
        >>> check_sampling(loader).passed
        False
    """
    if isinstance(batches, DataLoader):
        index_batches, sequential, n, coverage, allowed_missing = _loader_epoch(batches)
    else:
        index_batches = [_as_index_list(b) for b in batches]
        sequential, n, coverage, allowed_missing = False, None, True, 0
    index_batches = [b for b in index_batches if b]
    if labels is not None:
        labels = torch.as_tensor(labels).reshape(-1)
        n = labels.numel()
    flat = [i for b in index_batches for i in b]
    if not flat:
        raise ValueError("check_sampling got no indices: pass a DataLoader or an iterable of index batches.")
    if n is not None and (min(flat) < 0 or max(flat) >= n):
        raise ValueError(
            f"indices run from {min(flat)} to {max(flat)} but the dataset has {n} examples: "
            f"pass the labels of the dataset the indices refer to."
        )

    # 1. Order: ascents of the epoch's index sequence.
    idx = torch.tensor(flat, dtype=torch.long)  # (n_draws,)
    m = idx.numel()
    ascents = int((idx[1:] > idx[:-1]).sum()) if m > 1 else 0
    ascent_fraction = ascents / (m - 1) if m > 1 else 0.5
    ascent_p = None
    if m >= 3:
        ascent_p = _normal_two_sided((ascents - (m - 1) / 2) / math.sqrt((m + 1) / 12))

    # 2. Label mix: chi-square test of homogeneity on the (batch × class) table.
    chi2_stat = chi2_dof = chi2_p = None
    if labels is not None:
        _, codes = torch.unique(labels, return_inverse=True)  # (N,) class codes
        rows = torch.repeat_interleave(torch.arange(len(index_batches)), torch.tensor([len(b) for b in index_batches]))
        k = int(codes.max()) + 1
        table = torch.zeros(len(index_batches), k, dtype=torch.float64)  # (batches, classes)
        table.index_put_((rows, codes[idx]), torch.ones(m, dtype=torch.float64), accumulate=True)
        table = table[:, table.sum(0) > 0]
        expected = table.sum(1, keepdim=True) * table.sum(0, keepdim=True) / m
        chi2_stat = float(((table - expected) ** 2 / expected).sum())
        chi2_dof = (table.shape[0] - 1) * (table.shape[1] - 1)
        if chi2_dof > 0:
            chi2_p = _chi2_sf(chi2_stat, chi2_dof)

    # 3. Coverage.
    distinct = int(torch.unique(idx).numel())
    repeated = m - distinct
    missing = n - distinct if n is not None else 0
    coverage_fails = coverage and (repeated > 0 or missing > allowed_missing)

    p_values = [p for p in (ascent_p, chi2_p) if p is not None]
    p_value = min(1.0, min(p_values) * len(p_values)) if p_values else 1.0
    return SamplingReport(
        passed=bool(p_value >= level and not coverage_fails and not sequential),
        p_value=p_value,
        level=level,
        num_batches=len(index_batches),
        num_examples=m,
        dataset_size=n,
        repeated=repeated,
        missing=max(0, missing - allowed_missing) if coverage else missing,
        sequential_sampler=sequential,
        ascent_fraction=ascent_fraction,
        ascent_p_value=ascent_p,
        chi2_statistic=chi2_stat,
        chi2_dof=chi2_dof,
        chi2_p_value=chi2_p,
        coverage_checked=coverage,
    )
