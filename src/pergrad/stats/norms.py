"""Summaries of the per-example gradient norms: quantiles of a window or a stream, the largest norms.

:class:`NormHistogram` counts norms ‖∇ℓⱼ‖ in logarithmic bins whose width bounds the relative
error of every quantile: bin i holds norms in (γ^(i−1), γ^i] with γ = (1+α)/(1−α), and is read
back as 2γ^i/(γ+1), within a factor 1 ± α of every norm in it (α = 1%). The counts are float64
sums, so merging workers is one ``all_reduce``. :class:`LargestNorms` keeps the k largest norms
with their example ids, to find outliers or mislabeled data; merging workers is a gather.

References:
    Masson, Rim and Lee 2019, "DDSketch: A Fast and Fully-Mergeable Quantile Sketch with
    Relative-Error Guarantees", VLDB, arXiv:1908.10693 (the logarithmic binning).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["LargestNorms", "NormHistogram", "norm_quantiles"]

RELATIVE_ACCURACY = 0.01
_GAMMA = (1 + RELATIVE_ACCURACY) / (1 - RELATIVE_ACCURACY)
_LOG_GAMMA = math.log(_GAMMA)
_MIN_NORM, _MAX_NORM = 1e-20, 1e20  # norms outside are counted in the first or last bin
_FIRST_BIN = math.ceil(math.log(_MIN_NORM) / _LOG_GAMMA)
_LAST_BIN = math.ceil(math.log(_MAX_NORM) / _LOG_GAMMA)


def _checked_levels(q: float | Sequence[float]) -> Tensor:
    levels = torch.as_tensor(q, dtype=torch.float64)
    if ((levels < 0) | (levels > 1)).any():
        raise ValueError(f"quantile levels must lie in [0, 1], got {q}.")
    return levels


def _checked_sq_norms(sq_norms: Tensor) -> Tensor:
    """(n,) float64 on the CPU; refuses negative or non-finite values."""
    if sq_norms.dim() != 1:
        raise ValueError(f"sq_norms must have shape (n,), got {tuple(sq_norms.shape)}.")
    values = sq_norms.detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(values).all() or (values < 0).any():
        bad = (~torch.isfinite(values) | (values < 0)).nonzero().flatten().tolist()
        raise ValueError(f"squared norms of examples {bad[:10]} are negative, NaN or infinite.")
    return values


def norm_quantiles(norms: Tensor, q: float | Sequence[float]) -> Tensor:
    """Exact quantiles of a batch or window of per-example norms (linear interpolation).

    Args:
        norms: (n,) norms, e.g. ``result.sq_norms.sqrt()``.
        q: a level or sequence of levels in [0, 1].

    Returns:
        float64 tensor of the shape of ``q``. For a whole run, use :class:`NormHistogram`.

    Raises:
        ValueError: no norm, or a level outside [0, 1].
    """
    if norms.numel() == 0:
        raise ValueError("no norms: quantiles need at least one example.")
    return torch.quantile(norms.detach().to(device="cpu", dtype=torch.float64).flatten(), _checked_levels(q))


class NormHistogram(NamedTuple):
    """Counts of per-example norms: index 0 counts exact zeros, index 1 + (i − first bin) bin i.

    Attributes:
        counts: (1 + number of bins,) float64.
    """

    counts: Tensor

    @classmethod
    def init(cls) -> NormHistogram:
        """An empty histogram."""
        return cls(torch.zeros(2 + _LAST_BIN - _FIRST_BIN, dtype=torch.float64))

    def update(self, sq_norms: Tensor) -> NormHistogram:
        """Add a batch of (n,) squared norms, e.g. ``result.sq_norms`` or ``result.param_sq_norms[name]``."""
        norms = _checked_sq_norms(sq_norms).sqrt()
        positive = norms > 0
        bins = torch.ceil(torch.log(norms[positive]) / _LOG_GAMMA).clamp(_FIRST_BIN, _LAST_BIN)
        index = torch.cat([torch.zeros(int((~positive).sum()), dtype=torch.long), 1 + (bins.long() - _FIRST_BIN)])
        return NormHistogram(self.counts + torch.bincount(index, minlength=self.counts.shape[0]).double())

    def merge(self, other: NormHistogram) -> NormHistogram:
        """Both histograms' counts together."""
        return NormHistogram(self.counts + other.counts)

    @property
    def count(self) -> int:
        """Number of norms seen."""
        return int(self.counts.sum())

    def quantile(self, q: float | Sequence[float]) -> Tensor:
        """Norm quantiles, each within a factor 1 ± 1% of the exact one.

        The q-quantile is the order statistic of rank ⌊q (count − 1)⌋, counting from 0, as
        ``torch.quantile(norms, q, interpolation="lower")``.

        Args:
            q: a level or sequence of levels in [0, 1].

        Returns:
            float64 tensor of the shape of ``q``.

        Raises:
            ValueError: no norm seen yet, or a level outside [0, 1].
        """
        levels = _checked_levels(q)
        total = self.count
        if total == 0:
            raise ValueError("the histogram is empty: update it with some squared norms first.")
        ranks = torch.floor(levels * (total - 1))
        position = torch.searchsorted(self.counts.cumsum(0), ranks, right=True)
        exponent = (position - 1 + _FIRST_BIN).double()
        representative = 2 * torch.exp(exponent * _LOG_GAMMA) / (_GAMMA + 1)
        return torch.where(position == 0, 0.0, representative)


class LargestNorms(NamedTuple):
    """The k examples with the largest gradient norms seen so far, largest first.

    Ties are broken by the smaller id, so the result does not depend on the order of batches.

    Attributes:
        sq_norms: (≤ k,) float64 squared norms.
        ids: (≤ k,) int64 example ids: those given to :meth:`update`, or else the position in
            the stream of this state (0, 1, 2, ...).
        k: how many to keep.
        seen: number of examples seen.
    """

    sq_norms: Tensor
    ids: Tensor
    k: int
    seen: int

    @classmethod
    def init(cls, k: int) -> LargestNorms:
        """An empty state keeping the k largest."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}.")
        return cls(torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.long), k, 0)

    def update(self, sq_norms: Tensor, ids: Tensor | None = None) -> LargestNorms:
        """Add a batch of (n,) squared norms with their (n,) global example ids.

        Without ids, examples are numbered by their position in this state's stream; pass
        global ids (e.g. dataset indices) to merge workers or to find the examples again.
        """
        values = _checked_sq_norms(sq_norms)
        n = values.shape[0]
        if ids is None:
            ids = torch.arange(self.seen, self.seen + n)
        elif ids.shape != (n,):
            raise ValueError(f"ids must have shape ({n},) like sq_norms, got {tuple(ids.shape)}.")
        return self._keep(torch.cat([self.sq_norms, values]), torch.cat([self.ids, ids.detach().cpu().long()]), n)

    def merge(self, other: LargestNorms) -> LargestNorms:
        """The k largest of both states (ids should be global)."""
        if other.k != self.k:
            raise ValueError(f"cannot merge states keeping k={self.k} and k={other.k}.")
        return self._keep(torch.cat([self.sq_norms, other.sq_norms]), torch.cat([self.ids, other.ids]), other.seen)

    @property
    def norms(self) -> Tensor:
        """(≤ k,) the largest norms, largest first."""
        return self.sq_norms.sqrt()

    def _keep(self, values: Tensor, ids: Tensor, added: int) -> LargestNorms:
        by_id = torch.sort(ids, stable=True).indices
        order = by_id[torch.sort(values[by_id], descending=True, stable=True).indices][: self.k]
        return LargestNorms(values[order], ids[order], self.k, self.seen + added)
