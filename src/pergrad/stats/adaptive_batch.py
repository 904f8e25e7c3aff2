"""An adaptive batch size: keep B inside the confidence interval of the noise scale B_simple.

McCandlish et al. (2018) find that training is most efficient near the critical batch size, of
which the simple noise scale B_simple = tr Σ / |G|² is a proxy; it grows as the loss falls. The
rule follows it without chasing its noise: with [L, U] the confidence interval of B_simple
(:meth:`pergrad.NoiseScale.estimate`), clipped to the bounds [B_min, B_max],

- B holds while L ≤ B ≤ U: the data do not reject it, so noise alone never moves it;
- otherwise B moves to B_simple, rounded to a multiple of ``multiple`` (of the two sizes around
  it, the one nearest the interval), so that B lands in the middle of what the data accept and
  the next change waits for B_simple to move by about half the interval's width. Distances are
  ratios (max(L/b, b/U)), and B moves only when that brings it strictly nearer the interval, so a
  grid coarser than the interval cannot make it oscillate.

The learning rate follows the batch by the optimizer's rule, η(B) = η₀ (B / B_min)^p with
p = 1 for SGD (linear scaling, Goyal et al. 2017) and p = ½ for Adam-type optimizers (square-root
scaling, Malladi et al. 2022): η₀ is the rate at B_min, where training starts.

Example (one epoch of a loop of your own; batches stay random and without replacement)::

    rule = pergrad.AdaptiveBatchSize(16, 512, lr_scaling=pergrad.stats.lr_scaling_for(optimizer))
    order, start = torch.randperm(len(x_train)), 0
    while start < len(order):
        idx = order[start : start + rule.batch_size]          # (B,) the next B examples
        start += len(idx)
        ...                                                   # pe.backward(...), noise.update(result)
        rule.update(noise.estimate(0.95))
        for group in optimizer.param_groups:
            group["lr"] = base_lr * rule.lr_factor            # base_lr: the rate at B_min

References:
    McCandlish et al. 2018, "An Empirical Model of Large-Batch Training", arXiv:1812.06162.
    Goyal et al. 2017, "Accurate, Large Minibatch SGD", arXiv:1706.02677 (linear scaling).
    Malladi, Lyu, Panigrahi and Arora 2022, "On the SDEs and Scaling Rules for Adaptive Gradient
    Algorithms", NeurIPS, arXiv:2205.10287 (square-root scaling for Adam).
"""

from __future__ import annotations

import math

import torch

from .noise_scale import NoiseEstimate

__all__ = ["AdaptiveBatchSize", "LR_SCALINGS", "lr_scaling_for"]

LR_SCALINGS = {"linear": 1.0, "sqrt": 0.5}  # p in η(B) = η₀ (B / B_min)^p

_SQRT_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.Adamax, torch.optim.NAdam, torch.optim.RAdam)


def lr_scaling_for(optimizer: torch.optim.Optimizer) -> str:
    """The learning-rate scaling rule of an optimizer: "linear" for SGD, "sqrt" for the Adam family.

    Raises:
        ValueError: an optimizer with no known rule (pass ``lr_scaling`` yourself).
    """
    if isinstance(optimizer, torch.optim.SGD):
        return "linear"
    if isinstance(optimizer, _SQRT_OPTIMIZERS):
        return "sqrt"
    raise ValueError(
        f"no known learning-rate scaling rule for {type(optimizer).__name__}: pass "
        f"lr_scaling='linear' (SGD-like) or 'sqrt' (Adam-like) to AdaptiveBatchSize."
    )


class AdaptiveBatchSize:
    """The batch size to use next, from the noise scale's confidence interval (see the module).

    Args:
        min_batch_size: B_min ≥ 1, where training starts and the smallest batch used.
        max_batch_size: B_max ≥ B_min, the largest.
        lr_scaling: "linear" (SGD) or "sqrt" (Adam); see :func:`lr_scaling_for`.
        multiple: batch sizes are multiples of it (B_min and B_max must be).
        min_effective_batches: hold until the estimate rests on at least this many effective
            batches (Kish's n_eff); the interval assumes many.

    Attributes:
        batch_size: B, the batch size in force.
        changes: how many times B has changed.

    Raises:
        ValueError: bounds, multiple or scaling that cannot be used, naming the fix.
    """

    def __init__(
        self,
        min_batch_size: int,
        max_batch_size: int,
        *,
        lr_scaling: str = "linear",
        multiple: int = 1,
        min_effective_batches: float = 10.0,
    ):
        _check_settings(min_batch_size, max_batch_size, lr_scaling, multiple)
        self.min_batch_size, self.max_batch_size = min_batch_size, max_batch_size
        self.lr_scaling, self.multiple = lr_scaling, multiple
        self.min_effective_batches = min_effective_batches
        self.batch_size = min_batch_size
        self.changes = 0

    @property
    def lr_factor(self) -> float:
        """(B / B_min)^p: multiply the learning rate at B_min by it."""
        return (self.batch_size / self.min_batch_size) ** LR_SCALINGS[self.lr_scaling]

    def update(self, estimate: NoiseEstimate) -> int:
        """Move B to B_simple if its interval ``estimate.lower`` … ``estimate.upper`` rejects B; return B.

        Args:
            estimate: the smoothed noise scale with its interval, e.g. ``noise.estimate(0.95)``
                (floats). NaN (no batch seen) or too few effective batches: B holds.
        """
        lower, upper = float(estimate.lower), float(estimate.upper)
        if math.isnan(lower) or math.isnan(upper) or not estimate.effective_batches >= self.min_effective_batches:
            return self.batch_size
        lower, upper = self._clamp(lower), self._clamp(upper)
        current = self.batch_size
        if lower <= current <= upper:
            return current
        target = self._clamp(float(estimate.b_simple))  # inf (|G|² ≤ 0) becomes B_max
        m = self.multiple
        candidates = (math.floor(target / m) * m, math.ceil(target / m) * m)
        best = min(candidates, key=lambda b: (_distance(b, lower, upper), abs(math.log(b / target))))
        if _distance(best, lower, upper) < _distance(current, lower, upper):
            self.batch_size = int(best)
            self.changes += 1
        return self.batch_size

    def state_dict(self) -> dict:
        """The settings and B, for a checkpoint."""
        return {**self._settings(), "batch_size": self.batch_size, "changes": self.changes}

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`; refuses different settings."""
        saved = {k: state[k] for k in self._settings()}
        if saved != self._settings():
            raise ValueError(
                f"the saved AdaptiveBatchSize has settings {saved} but this one has {self._settings()}: "
                "create it with the saved settings."
            )
        self.batch_size, self.changes = int(state["batch_size"]), int(state["changes"])

    def _settings(self) -> dict:
        return {
            "min_batch_size": self.min_batch_size,
            "max_batch_size": self.max_batch_size,
            "lr_scaling": self.lr_scaling,
            "multiple": self.multiple,
            "min_effective_batches": self.min_effective_batches,
        }

    def _clamp(self, b: float) -> float:
        return min(max(b, self.min_batch_size), self.max_batch_size)


def _distance(b: float, lower: float, upper: float) -> float:
    """How far b lies outside [lower, upper], as a ratio ≥ 1 (1 inside)."""
    return max(lower / b, b / upper, 1.0)


def _check_settings(min_batch_size: int, max_batch_size: int, lr_scaling: str, multiple: int) -> None:
    if lr_scaling not in LR_SCALINGS:
        raise ValueError(f"unknown lr_scaling {lr_scaling!r}: use 'linear' (SGD) or 'sqrt' (Adam).")
    if multiple < 1 or min_batch_size < 1:
        raise ValueError(f"min_batch_size and multiple must be at least 1, got {min_batch_size} and {multiple}.")
    if max_batch_size < min_batch_size:
        raise ValueError(
            f"max_batch_size {max_batch_size} is below min_batch_size {min_batch_size}: give a max at least the min."
        )
    if min_batch_size % multiple or max_batch_size % multiple:
        raise ValueError(
            f"min_batch_size {min_batch_size} and max_batch_size {max_batch_size} must be multiples of "
            f"{multiple}: round them to multiples of {multiple}."
        )
