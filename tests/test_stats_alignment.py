"""GradientAlignment: consecutive batch gradients against other pairs, streaming and resumable."""

import pytest
import torch

from pergrad.stats import GradientAlignment, consecutive_alignment_test


def _ar1(rho, steps=100, dim=500, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mean = torch.randn(dim, generator=gen)
    z = torch.randn(dim, generator=gen)
    grads = []
    for _ in range(steps):
        z = rho * z + (1 - rho**2) ** 0.5 * torch.randn(dim, generator=gen)
        grads.append(mean + 2 * z)
    return grads


def test_alignment_flags_autocorrelated_gradients():
    report = consecutive_alignment_test(_ar1(0.9))
    assert not report.passed and report.p_value < 1e-3
    assert report.consecutive_cosine > report.other_cosine
    assert "ordered or clustered" in report.explanation


def test_alignment_passes_iid_gradients():
    report = consecutive_alignment_test(_ar1(0.0))
    assert report.passed and report.other_cosine > 0.1  # shared mean, no order


def test_alignment_sketch_matches_full():
    grads = _ar1(0.9, dim=20000)
    full = consecutive_alignment_test(grads, sketch_dim=None)
    sketched = GradientAlignment(sketch_dim=4096)
    for g in grads:
        sketched.update(g)
    result = sketched.result()
    assert abs(result.consecutive_cosine - full.consecutive_cosine) < 0.05
    assert not result.passed


def test_alignment_needs_steps():
    acc = GradientAlignment()
    acc.update(torch.ones(3))
    with pytest.raises(ValueError, match="at least 4 steps"):
        acc.result()


def test_alignment_state_round_trip_and_recent_cosine():
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(3000, generator=gen) for _ in range(12)]
    whole = GradientAlignment(sketch_dim=256, seed=3, max_steps=8)
    half = GradientAlignment(sketch_dim=256, seed=3, max_steps=8)
    for k, g in enumerate(grads):
        whole.update(g)
        if k < 6:
            half.update(g)
    resumed = GradientAlignment()
    resumed.load_state_dict(half.state_dict())
    for g in grads[6:]:
        resumed.update(g)
    assert resumed.result() == whole.result()
    assert whole.result().num_steps == 8  # max_steps keeps the most recent
    same = GradientAlignment(sketch_dim=None)
    for g in (grads[0], grads[0], 2 * grads[0]):
        same.update(g)
    assert same.recent_cosine(2) == pytest.approx(1.0)
    assert GradientAlignment().recent_cosine(3) != GradientAlignment().recent_cosine(3)  # NaN before 2 steps
