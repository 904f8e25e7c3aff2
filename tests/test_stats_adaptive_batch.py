"""AdaptiveBatchSize: its decisions on scripted noise-scale sequences, and the learning-rate rule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pergrad import AdaptiveBatchSize
from pergrad.stats import lr_scaling_for
from pergrad.stats.batch import BatchEstimate
from pergrad.stats.noise_scale import NoiseEstimate, NoiseState


def _estimate(b_simple: float, lower: float, upper: float, effective_batches: float = 40.0) -> NoiseEstimate:
    """A smoothed estimate with the interval given (tr Σ and |G|² only need the right ratio)."""
    return NoiseEstimate(b_simple, 1.0, b_simple, lower, upper, effective_batches)


def _at(rule: AdaptiveBatchSize, batch_size: int) -> AdaptiveBatchSize:
    """The rule as a checkpoint taken at ``batch_size`` would restore it."""
    rule.load_state_dict({**rule.state_dict(), "batch_size": batch_size})
    return rule


def test_grows_with_the_noise_scale_in_steps_and_stays_inside_its_interval():
    rule = AdaptiveBatchSize(16, 512)
    sizes = []
    for t in range(200):  # B_simple climbs from 20 to 1000; the interval is [0.7, 1.5] × B_simple
        b = 20 * 50 ** (t / 199)
        rule.update(_estimate(b, 0.7 * b, 1.5 * b))
        lower, upper = min(max(0.7 * b, 16), 512), min(1.5 * b, 512)
        assert lower <= rule.batch_size <= upper, (t, b, rule.batch_size)
        sizes.append(rule.batch_size)
    assert sizes == sorted(sizes) and sizes[-1] == 512
    # a staircase: each change waits until B_simple has grown by 1/0.7, so about log(512/20)/log(1/0.7) ≈ 9
    assert 7 <= rule.changes == len(set(sizes)) - 1 <= 11


def test_moves_to_b_simple_when_the_interval_rejects_b():
    rule = AdaptiveBatchSize(8, 1024)
    assert rule.update(_estimate(100.4, 60.0, 200.0)) == 100  # up, to B_simple rounded
    assert rule.update(_estimate(150.0, 101.0, 300.0)) == 150
    assert rule.update(_estimate(40.0, 30.0, 60.0)) == 40  # down: the interval lies below B
    assert rule.changes == 3


def test_holds_while_the_interval_contains_b_however_far_b_simple_wanders():
    rule = _at(AdaptiveBatchSize(16, 512), 64)
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        b = float(30 * 5 ** torch.rand((), generator=gen))  # point estimates from 30 to 150
        assert rule.update(_estimate(b, min(b, 64.0) * 0.9, max(b, 64.0) * 1.1)) == 64
    assert rule.changes == 0


def _noisy_runs(rules: list[AdaptiveBatchSize], steps: int, seed: int) -> tuple[list[list[int]], list[int]]:
    """Each rule under its own stream of noisy per-batch estimates of a fixed B_simple = 64,
    smoothed as NoiseScale(beta=0.95) smooths them (one NoiseState, a coordinate per rule); also
    how often each stream's point estimate, rounded and clipped to the bounds, changes."""
    k = len(rules)
    gen = torch.Generator().manual_seed(seed)
    state = NoiseState.init(k)
    sizes, point_changes, last_point = [[] for _ in rules], [0] * k, [None] * k
    for _ in range(steps):
        trace = 64.0 * (1 + 0.3 * torch.randn(k, generator=gen, dtype=torch.float64))
        grad_sq = 1.0 + torch.randn(k, generator=gen, dtype=torch.float64)
        state = state.update(BatchEstimate(trace, grad_sq), beta=0.95)
        estimates = state.finalize(0.95)
        for i, rule in enumerate(rules):
            estimate = NoiseEstimate(*(float(f[i]) for f in estimates))
            sizes[i].append(rule.update(estimate))
            point = round(min(max(estimate.b_simple, 16), 512))
            point_changes[i] += last_point[i] is not None and point != last_point[i]
            last_point[i] = point
    return sizes, point_changes


def test_noise_alone_rarely_moves_b():
    """At a fixed true B_simple = 64 the point estimate changes at almost every step; B changes
    at a few percent of them (when the 95% interval misses 64) and stays near 64."""
    rules = [_at(AdaptiveBatchSize(16, 512), 64) for _ in range(4)]
    sizes, point_changes = _noisy_runs(rules, 600, seed=0)
    for rule, b, moves in zip(rules, sizes, point_changes):
        assert moves > 500
        assert rule.changes <= 20
        assert 64 / 3 <= min(b) and max(b) <= 64 * 3


def test_starting_at_the_minimum_it_climbs_to_the_noise_scale_and_then_holds():
    rules = [AdaptiveBatchSize(16, 512) for _ in range(4)]
    for b in _noisy_runs(rules, 600, seed=1)[0]:
        assert b[0] == 16 and all(64 / 3 <= size <= 64 * 3 for size in b[100:])


def test_respects_the_bounds():
    rule = AdaptiveBatchSize(16, 256)
    assert rule.update(_estimate(900.0, 600.0, 1500.0)) == 256  # all above the max: to the max
    assert rule.update(_estimate(5000.0, 3000.0, math.inf)) == 256  # and holds there
    assert rule.update(_estimate(2.0, 0.5, 4.0)) == 16  # all below the min: to the min
    assert rule.update(_estimate(0.0, 0.0, 0.0)) == 16
    assert rule.update(_estimate(math.inf, 300.0, math.inf)) == 256  # |G|² ≤ 0: B_simple unbounded
    assert rule.changes == 3


def test_holds_without_enough_evidence():
    rule = AdaptiveBatchSize(16, 256)
    assert rule.update(NoiseEstimate(*(math.nan,) * 6)) == 16  # no batch seen
    assert rule.update(_estimate(100.0, 80.0, 120.0, effective_batches=9.5)) == 16
    assert rule.update(_estimate(100.0, 80.0, 120.0, effective_batches=10.0)) == 100


def test_a_grid_coarser_than_the_interval_does_not_oscillate():
    rule = AdaptiveBatchSize(16, 256, multiple=16)
    sizes = {rule.update(_estimate(40.0 + (-1) ** t, 37.0, 43.0)) for t in range(50)}
    # 48 lies 48/43 = 1.12 above the interval, 32 lies 37/32 = 1.16 below: 48, then hold
    assert sizes == {48} and rule.changes == 1


def test_learning_rate_scaling_follows_the_optimizer():
    params = [nn.Parameter(torch.zeros(2))]
    assert lr_scaling_for(torch.optim.SGD(params, lr=0.1)) == "linear"
    assert lr_scaling_for(torch.optim.Adam(params)) == "sqrt"
    assert lr_scaling_for(torch.optim.AdamW(params)) == "sqrt"
    with pytest.raises(ValueError, match="lr_scaling='linear'"):
        lr_scaling_for(torch.optim.Adagrad(params))
    linear, sqrt = AdaptiveBatchSize(16, 256), AdaptiveBatchSize(16, 256, lr_scaling="sqrt")
    assert linear.lr_factor == sqrt.lr_factor == 1.0
    for rule in (linear, sqrt):
        rule.update(_estimate(64.0, 50.0, 80.0))
    assert linear.lr_factor == 4.0 and sqrt.lr_factor == 2.0


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((16, 8), {}, "below min_batch_size"),
        ((0, 8), {}, "at least 1"),
        ((16, 100), {"multiple": 16}, "multiples of 16"),
        ((16, 64), {"lr_scaling": "cubic"}, "unknown lr_scaling"),
    ],
)
def test_bad_settings_are_refused(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaptiveBatchSize(*args, **kwargs)


def test_state_round_trip_and_refusal_of_other_settings():
    rule = AdaptiveBatchSize(16, 256)
    rule.update(_estimate(64.0, 50.0, 80.0))
    restored = AdaptiveBatchSize(16, 256)
    restored.load_state_dict(rule.state_dict())
    assert (restored.batch_size, restored.changes) == (64, 1)
    with pytest.raises(ValueError, match="saved settings"):
        AdaptiveBatchSize(16, 512).load_state_dict(rule.state_dict())
