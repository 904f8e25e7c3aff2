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

``GradientAlignment`` is the training-time counterpart: it tests whether consecutive mini-batch
gradients are more aligned than non-consecutive ones (a sign of ordered or correlated batches).
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

__all__ = [
    "AlignmentReport",
    "GradientAlignment",
    "SamplingReport",
    "check_sampling",
    "consecutive_alignment_test",
]

_FIX = (
    "Fix: DataLoader(dataset, shuffle=True), or a RandomSampler / DistributedSampler "
    "(calling sampler.set_epoch(epoch) every epoch)."
)


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
                "batches differ in their label mix far more than random batches would "
                "(label-sorted or clustered data)"
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


@dataclass(frozen=True)
class AlignmentReport:
    """Consecutive mini-batch gradients against non-consecutive ones.

    Attributes:
        passed: p_value >= level.
        p_value: one-sided permutation p-value that consecutive gradients are more aligned.
        consecutive_cosine: mean cosine between gradients of steps t and t+1.
        other_cosine: mean cosine over all other pairs of distinct steps.
        num_steps: gradients stored.
        num_permutations: random orders the statistic was compared with.
    """

    passed: bool
    p_value: float
    consecutive_cosine: float
    other_cosine: float
    num_steps: int
    num_permutations: int

    @property
    def explanation(self) -> str:
        head = (
            f"Over {self.num_steps} steps, consecutive batch gradients have mean cosine "
            f"{self.consecutive_cosine:.3f}, other pairs {self.other_cosine:.3f} "
            f"(permutation p-value {self.p_value:.3g})."
        )
        if self.passed:
            return f"{head} No sign that successive batches are correlated."
        return (
            f"{head} Successive mini-batch gradients are more alike than random pairs: the batches "
            f"are probably ordered or clustered (sorted labels, unshuffled data), so each step is "
            f"not an independent, unbiased estimate of the full gradient. {_FIX}"
        )


class GradientAlignment:
    """Streaming test: are consecutive batch gradients more aligned than non-consecutive ones?

    Call ``update(flat_grad)`` once per step with the flattened mini-batch gradient, shape (D,),
    then ``result()``. Each gradient is kept as a unit vector in float64; with ``sketch_dim``
    set it is first compressed by a seeded count sketch to (sketch_dim,), which preserves inner
    products in expectation, so memory is steps × sketch_dim instead of steps × D.

    The statistic is the mean cosine of consecutive pairs; its null distribution is obtained by
    recomputing it over ``num_permutations`` random orders of the stored gradients (seeded), so
    gradients that all share a common direction, but in no particular order, pass.

    Args:
        sketch_dim: dimension of the count sketch, or None to keep the gradients whole.
        num_permutations: random orders for the permutation test.
        level: significance level.
        seed: seed of the sketch hashes and of the permutations.
        max_steps: keep only the most recent this many gradients (None keeps all), bounding
            memory at max_steps × sketch_dim floats in long runs.
    """

    def __init__(
        self,
        sketch_dim: int | None = 4096,
        *,
        num_permutations: int = 1999,
        level: float = 0.001,
        seed: int = 0,
        max_steps: int | None = None,
    ) -> None:
        self.sketch_dim = sketch_dim
        self.max_steps = max_steps
        self.num_permutations = num_permutations
        self.level = level
        self.seed = seed
        self._units: list[Tensor] = []
        self._hash: Tensor | None = None
        self._sign: Tensor | None = None

    def update(self, flat_grad: Tensor) -> None:
        g = flat_grad.detach().reshape(-1).to(device="cpu", dtype=torch.float64)  # (D,)
        if self.sketch_dim is not None and g.numel() > self.sketch_dim:
            if self._hash is None:
                self._make_sketch(g.numel())
            if g.numel() != self._hash.numel():
                raise ValueError(f"gradient size changed from {self._hash.numel()} to {g.numel()}.")
            g = torch.zeros(self.sketch_dim, dtype=torch.float64).index_add_(0, self._hash, self._sign * g)
        norm = g.norm()
        self._units.append(g / norm if norm > 0 else g)
        if self.max_steps is not None and len(self._units) > self.max_steps:
            del self._units[0]

    def recent_cosine(self, steps: int) -> float:
        """Mean cosine between consecutive gradients among the last ``steps`` + 1 (NaN if < 2 kept)."""
        recent = self._units[-(steps + 1) :]
        if len(recent) < 2:
            return math.nan
        u = torch.stack(recent)  # (k, D')
        return float((u[1:] * u[:-1]).sum(1).mean())

    def state_dict(self) -> dict:
        """Settings and the stored unit gradients, for a checkpoint."""
        return {
            "sketch_dim": self.sketch_dim,
            "num_permutations": self.num_permutations,
            "level": self.level,
            "seed": self.seed,
            "max_steps": self.max_steps,
            "grad_dim": None if self._hash is None else self._hash.numel(),
            "units": torch.stack(self._units) if self._units else None,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict` (the sketch is rebuilt from the seed)."""
        self.sketch_dim, self.num_permutations = state["sketch_dim"], state["num_permutations"]
        self.level, self.seed, self.max_steps = state["level"], state["seed"], state["max_steps"]
        self._hash = self._sign = None
        if state["grad_dim"] is not None:
            self._make_sketch(state["grad_dim"])
        self._units = [] if state["units"] is None else list(state["units"].unbind(0))

    def _make_sketch(self, dim: int) -> None:
        gen = torch.Generator().manual_seed(self.seed)
        self._hash = torch.randint(self.sketch_dim, (dim,), generator=gen)
        self._sign = torch.randint(2, (dim,), generator=gen).to(torch.float64) * 2 - 1

    def result(self) -> AlignmentReport:
        t = len(self._units)
        if t < 4:
            raise ValueError(f"GradientAlignment needs at least 4 steps, got {t}: call update() more.")
        u = torch.stack(self._units)  # (T, D')
        cos = u @ u.T  # (T, T)
        observed = float(cos.diagonal(1).mean())
        off_diag_mean = float((cos.sum() - cos.diagonal().sum()) / (t * (t - 1)))
        # all off-diagonal pairs = 2(T−1) consecutive entries + the rest
        other = (off_diag_mean * t * (t - 1) - 2 * observed * (t - 1)) / (t * (t - 1) - 2 * (t - 1))
        gen = torch.Generator().manual_seed(self.seed)
        perms = torch.argsort(torch.rand(self.num_permutations, t, generator=gen), dim=1)  # (P, T)
        null = cos[perms[:, :-1], perms[:, 1:]].mean(1)  # (P,)
        p_value = (1 + int((null >= observed - 1e-12).sum())) / (1 + self.num_permutations)
        return AlignmentReport(
            passed=p_value >= self.level,
            p_value=p_value,
            consecutive_cosine=observed,
            other_cosine=other,
            num_steps=t,
            num_permutations=self.num_permutations,
        )


def consecutive_alignment_test(
    batch_grads_sequence: Iterable[Tensor], **kwargs
) -> AlignmentReport:
    """``GradientAlignment`` over a whole sequence of flat batch gradients, each of shape (D,).

    Keyword arguments go to ``GradientAlignment``.
    """
    acc = GradientAlignment(**kwargs)
    for g in batch_grads_sequence:
        acc.update(g)
    return acc.result()
