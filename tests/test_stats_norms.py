"""Streaming summaries of per-example norms: quantiles (log histogram) and the largest norms."""

from __future__ import annotations

import pytest
import torch

from pergrad.stats import LargestNorms, NormHistogram, norm_quantiles


def _sq_norms(n: int, seed: int) -> torch.Tensor:
    """Squared norms over ten orders of magnitude, with a few exact zeros."""
    gen = torch.Generator().manual_seed(seed)
    sq = torch.exp(4 * torch.randn(n, dtype=torch.float64, generator=gen))
    sq[::97] = 0.0
    return sq


def test_quantiles_within_one_percent_of_the_exact_ones():
    batches = [_sq_norms(300, seed) for seed in range(4)]
    hist = NormHistogram.init()
    for b in batches:
        hist = hist.update(b)
    norms = torch.cat(batches).sqrt()
    levels = [0.0, 0.005, 0.1, 0.25, 0.5, 0.9, 0.99, 1.0]
    exact = torch.quantile(norms, torch.tensor(levels, dtype=torch.float64), interpolation="lower")
    torch.testing.assert_close(hist.quantile(levels), exact, rtol=0.01, atol=0)
    assert hist.count == 1200
    assert float(hist.quantile(0.0)) == 0.0  # the exact zeros
    assert hist.quantile(0.5).shape == ()


def test_norm_quantiles_of_a_window():
    norms = _sq_norms(101, 3).sqrt().float()
    levels = (0.1, 0.5, 0.9)
    expected = torch.quantile(norms.double(), torch.tensor(levels, dtype=torch.float64))
    torch.testing.assert_close(norm_quantiles(norms, levels), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no norms"):
        norm_quantiles(torch.zeros(0), 0.5)
    with pytest.raises(ValueError, match="levels"):
        norm_quantiles(norms, -0.1)


def test_histogram_merge_equals_one_histogram_over_all_batches():
    a, b = _sq_norms(200, 1), _sq_norms(150, 2)
    merged = NormHistogram.init().update(a).merge(NormHistogram.init().update(b))
    single = NormHistogram.init().update(torch.cat([a, b]))
    torch.testing.assert_close(merged.counts, single.counts, rtol=0, atol=0)


def test_histogram_refusals():
    with pytest.raises(ValueError, match="empty"):
        NormHistogram.init().quantile(0.5)
    with pytest.raises(ValueError, match="levels"):
        NormHistogram.init().update(torch.ones(3)).quantile(1.5)
    with pytest.raises(ValueError, match="negative, NaN or infinite"):
        NormHistogram.init().update(torch.tensor([1.0, float("nan"), -1.0]))
    with pytest.raises(ValueError, match="shape"):
        NormHistogram.init().update(torch.ones(2, 2))


def test_largest_norms_keep_global_ids_and_match_a_full_sort():
    batches = [_sq_norms(50, seed) for seed in range(5)]
    top = LargestNorms.init(7)
    for i, b in enumerate(batches):
        top = top.update(b, ids=torch.arange(50) + 1000 * i)
    values = torch.cat(batches)
    ids = torch.cat([torch.arange(50) + 1000 * i for i in range(5)])
    order = torch.sort(values, descending=True).indices[:7]
    torch.testing.assert_close(top.sq_norms, values[order], rtol=0, atol=0)
    assert top.ids.tolist() == ids[order].tolist()
    torch.testing.assert_close(top.norms, values[order].sqrt(), rtol=0, atol=0)
    assert top.seen == 250


def test_largest_norms_merge_equals_one_state_ties_broken_by_id():
    values = torch.tensor([3.0, 1.0, 3.0, 2.0, 3.0, 0.5], dtype=torch.float64)
    ids = torch.tensor([10, 11, 2, 13, 7, 15])
    single = LargestNorms.init(3).update(values, ids)
    merged = LargestNorms.init(3).update(values[3:], ids[3:]).merge(LargestNorms.init(3).update(values[:3], ids[:3]))
    assert single.ids.tolist() == merged.ids.tolist() == [2, 7, 10]
    torch.testing.assert_close(merged.sq_norms, single.sq_norms, rtol=0, atol=0)
    assert merged.seen == single.seen == 6


def test_largest_norms_number_examples_without_ids():
    top = LargestNorms.init(2).update(torch.tensor([1.0, 5.0])).update(torch.tensor([4.0, 0.0, 9.0]))
    assert top.ids.tolist() == [4, 1]


def test_largest_norms_refusals():
    with pytest.raises(ValueError, match="k must be"):
        LargestNorms.init(0)
    with pytest.raises(ValueError, match="ids must have shape"):
        LargestNorms.init(2).update(torch.ones(3), ids=torch.arange(2))
    with pytest.raises(ValueError, match="k=2 and k=3"):
        LargestNorms.init(2).merge(LargestNorms.init(3))
