"""check_sampling on digits labels (N=1797, 10 classes, batch 32)."""

import pytest
import torch
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

from pergrad.checks.sampling import SamplingReport, check_sampling

LABELS = torch.as_tensor(load_digits().target)  # (1797,)
N = LABELS.numel()
B = 32


def _loader(shuffle, seed=0, **kwargs):
    dataset = TensorDataset(torch.zeros(N, 1), LABELS)
    gen = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=B, shuffle=shuffle, generator=gen, **kwargs)


def _split(order):
    return [order[i : i + B] for i in range(0, len(order), B)]


def test_label_sorted_batches_flagged():
    # sort by label, then shuffle within each label so the index order itself is random-looking
    gen = torch.Generator().manual_seed(1)
    perm = torch.randperm(N, generator=gen)
    order = perm[torch.argsort(LABELS[perm], stable=True)]
    report = check_sampling(_split(order), LABELS)
    assert isinstance(report, SamplingReport)
    assert not report.passed
    assert report.chi2_p_value < 1e-3 and report.p_value < 1e-3
    assert report.ascent_p_value > 1e-3  # only the label test catches it
    assert "label mix" in report.explanation and "shuffle=True" in report.explanation


def test_sequential_loader_flagged():
    report = check_sampling(_loader(shuffle=False), LABELS)
    assert not report.passed
    assert report.sequential_sampler
    assert report.ascent_fraction == 1.0 and report.p_value < 1e-3
    assert report.num_batches == 57 and report.num_examples == N
    assert "SequentialSampler" in report.explanation


def test_sorted_index_lists_flagged_without_labels():
    report = check_sampling(_split(torch.arange(N)))
    assert not report.passed and not report.sequential_sampler
    assert "sorted" in report.explanation


def test_shuffled_loader_passes():
    reports = [check_sampling(_loader(shuffle=True, seed=s), LABELS) for s in range(40)]
    assert sum(r.passed for r in reports) >= 38
    r = reports[0]
    assert r.passed and r.repeated == 0 and r.missing == 0 and r.chi2_dof == 56 * 9
    assert 0.45 < r.ascent_fraction < 0.55
    assert "looks random" in r.explanation


def test_shuffled_loader_with_drop_last_passes():
    report = check_sampling(_loader(shuffle=True, seed=3, drop_last=True), LABELS)
    assert report.passed and report.missing == 0 and report.num_examples == 56 * B


def test_repeated_examples_flagged():
    order = torch.randperm(N, generator=torch.Generator().manual_seed(2))
    order[10] = order[500]  # one example drawn twice, another never
    report = check_sampling(_split(order), LABELS)
    assert not report.passed
    assert report.repeated == 1 and report.missing == 1
    assert "repeat" in report.explanation and "never drawn" in report.explanation


def test_missing_examples_flagged():
    order = torch.randperm(N, generator=torch.Generator().manual_seed(3))[:-100]
    report = check_sampling(_split(order), LABELS)
    assert not report.passed and report.repeated == 0 and report.missing == 100


def test_out_of_range_indices_raise():
    with pytest.raises(ValueError, match="1797 examples"):
        check_sampling([[0, 1, N]], LABELS)
