"""Are consecutive mini-batch gradients more aligned than non-consecutive ones?

With random batches, successive mini-batch gradients are (nearly) independent draws around the
full gradient; ordered or clustered batches (sorted labels, unshuffled data) make neighbours
alike. :class:`GradientAlignment` keeps each step's batch gradient as a unit vector (count-sketched
to a fixed size) and tests the mean cosine of consecutive pairs against random orders of the same
gradients (a permutation test), so gradients that share a common direction in no particular
order pass. It is the gradient-side counterpart of :func:`pergrad.checks.check_sampling`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["AlignmentReport", "GradientAlignment", "consecutive_alignment_test", "SHUFFLE_FIX"]

SHUFFLE_FIX = (
    "Fix: DataLoader(dataset, shuffle=True), or a RandomSampler / DistributedSampler "
    "(calling sampler.set_epoch(epoch) every epoch)."
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
            f"not an independent, unbiased estimate of the full gradient. {SHUFFLE_FIX}"
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


def consecutive_alignment_test(batch_grads_sequence: Iterable[Tensor], **kwargs) -> AlignmentReport:
    """``GradientAlignment`` over a whole sequence of flat batch gradients, each of shape (D,).

    Keyword arguments go to ``GradientAlignment``.
    """
    acc = GradientAlignment(**kwargs)
    for g in batch_grads_sequence:
        acc.update(g)
    return acc.result()
