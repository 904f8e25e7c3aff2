"""The central claim checked on a run's own data: a random mini-batch gradient is unbiased.

Take the N training examples at fixed θ, their gradients ∇ℓᵢ (rows of a matrix, float64) and
the full-data gradient ∇C = (1/N) Σᵢ ∇ℓᵢ. For a batch S of B examples drawn uniformly
*without* replacement, ḡ_B = (1/B) Σ_{i∈S} ∇ℓᵢ satisfies

    E[ḡ_B] = ∇C,        E‖ḡ_B − ∇C‖² = tr Σ / B · (N − B) / (N − 1),

where tr Σ = (1/N) Σᵢ ‖∇ℓᵢ − ∇C‖² (the finite-population correction (N − B)/(N − 1) is what
sampling without replacement saves). Both sides are measured here over many random batches.

Every squared distance needs only the Gram matrix of the deviations, K = D Dᵀ with
D = rows − ∇C (N, N): ‖ḡ_S − ∇C‖² = 1_Sᵀ K 1_S / B². So one matrix product of the stored
gradients serves any number of draws, and each draw costs O(N·B) instead of O(B·p).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..stats.batch import noise_coefficient

__all__ = [
    "SamplingRow",
    "ConvergenceRow",
    "UnbiasednessCheck",
    "MAX_ENTRIES",
    "MAX_EXAMPLES",
    "examples_for_check",
    "batch_sizes_for_check",
    "center_and_gram",
    "draw_batches",
    "sampling_errors",
    "check_unbiasedness",
]

MAX_ENTRIES = 50_000_000  # N·p above this: the check runs on a random subset of examples
MAX_EXAMPLES = 4096  # N above this: same (the Gram matrix is N × N)
MAX_BATCH = 512
DRAWS = 400  # random batches per batch size
CONVERGENCE_DRAWS = (10, 30, 100, 300, 1000, 3000, 10000)
_CHUNK = 500  # batches drawn at once


@dataclass(frozen=True)
class SamplingRow:
    """One batch size of the check.

    Attributes:
        batch_size: B.
        measured: mean over the draws of ‖ḡ_B − ∇C‖².
        std_error: the standard error of ``measured`` (sample std / √draws).
        predicted: tr Σ / B · (N − B)/(N − 1).
        mean_rel_error: ‖(mean of the draws' ḡ_B) − ∇C‖ / ‖∇C‖.
        chance_rel_error: what chance alone gives that error for unbiased draws,
            √(predicted / draws) / ‖∇C‖ (its root mean square).
    """

    batch_size: int
    measured: float
    std_error: float
    predicted: float
    mean_rel_error: float
    chance_rel_error: float

    @property
    def ratio(self) -> float:
        """measured / predicted; 1 within a few standard errors when the claim holds."""
        return self.measured / self.predicted if self.predicted > 0 else math.nan


@dataclass(frozen=True)
class ConvergenceRow:
    """The mean of the first ``draws`` batch gradients against ∇C, at one batch size.

    Attributes:
        draws: how many random batches were averaged.
        rel_error: ‖(mean of their ḡ_B) − ∇C‖ / ‖∇C‖.
        chance_rel_error: √(predicted / draws) / ‖∇C‖, its expected size without bias.
    """

    draws: int
    rel_error: float
    chance_rel_error: float


@dataclass(frozen=True)
class UnbiasednessCheck:
    """The sampling check at θ.

    Attributes:
        n_examples: N, examples the check ran on (all training examples, or a subset).
        n_train: training examples in the run.
        n_params: p, trainable scalars.
        draws: random batches per batch size.
        trace_sigma: tr Σ = (1/N) Σᵢ ‖∇ℓᵢ − ∇C‖².
        full_grad_sq_norm: ‖∇C‖².
        autograd_max_diff: max |(1/N) Σᵢ ∇ℓᵢ − ∇ of the mean loss by plain autograd|, the
            identity the per-example gradients rest on.
        rows: one per batch size.
        convergence_batch_size: the B of ``convergence``.
        convergence: the mean of more and more batch gradients against ∇C.
    """

    n_examples: int
    n_train: int
    n_params: int
    draws: int
    trace_sigma: float
    full_grad_sq_norm: float
    autograd_max_diff: float
    rows: list[SamplingRow]
    convergence_batch_size: int
    convergence: list[ConvergenceRow]

    @property
    def subsampled(self) -> bool:
        return self.n_examples < self.n_train


def examples_for_check(n_train: int, n_params: int, generator: torch.Generator) -> Tensor:
    """(N,) sorted indices of the examples the check uses: all of them if the gradient
    matrix (N·p float64) and the Gram matrix (N²) fit the limits, else a random subset."""
    limit = min(MAX_EXAMPLES, max(2, MAX_ENTRIES // max(n_params, 1)))
    if n_train <= limit:
        return torch.arange(n_train)
    return torch.randperm(n_train, generator=generator)[:limit].sort().values


def batch_sizes_for_check(n: int, run_batch_size: int) -> list[int]:
    """B = 1, 2, 4, … up to min(N/2, 512), and the run's own batch size if within that range."""
    top = min(n // 2, MAX_BATCH)
    sizes = {2**k for k in range(top.bit_length()) if 2**k <= top}
    if 1 <= run_batch_size <= top:
        sizes.add(run_batch_size)
    return sorted(sizes)


def center_and_gram(grads: Tensor) -> tuple[Tensor, Tensor]:
    """The full-data gradient and the Gram matrix of the deviations from it.

    Args:
        grads: (N, p) float64 per-example gradients; centred *in place* (it becomes D) to
            keep one copy of the largest array.

    Returns:
        full_grad: (p,) ∇C = mean of the rows.
        gram: (N, N) K = D Dᵀ, Kᵢⱼ = ⟨∇ℓᵢ − ∇C, ∇ℓⱼ − ∇C⟩.
    """
    full_grad = grads.mean(0)
    grads -= full_grad
    return full_grad, grads @ grads.T


def draw_batches(n: int, batch_size: int, draws: int, generator: torch.Generator) -> Tensor:
    """(draws, n) float64 0/1 rows, each with ``batch_size`` ones at uniformly random
    positions: independent batches, each drawn without replacement.

    The positions of the B largest of n i.i.d. uniforms are a uniformly random B-subset.
    """
    index = torch.rand(draws, n, generator=generator).topk(batch_size, dim=1, sorted=False).indices
    return torch.zeros(draws, n, dtype=torch.float64).scatter_(1, index, 1.0)


def sampling_errors(gram: Tensor, selection: Tensor) -> Tensor:
    """(draws,) ‖ḡ_S − ∇C‖² for each batch S (a row of ``selection``, (draws, N)), from K."""
    batch_size = selection[0].sum()
    return ((selection @ gram) * selection).sum(1) / batch_size**2


def check_unbiasedness(
    grads: Tensor,
    autograd_mean: Tensor,
    n_train: int,
    run_batch_size: int,
    generator: torch.Generator,
    draws: int = DRAWS,
) -> UnbiasednessCheck:
    """Measure E‖ḡ_B − ∇C‖² and E[ḡ_B] − ∇C over random batches, against the prediction.

    Args:
        grads: (N, p) float64 per-example gradients at θ; overwritten (centred in place).
        autograd_mean: (p,) ∇ of the mean loss over the same N examples by plain autograd.
        n_train: training examples in the run (N < n_train when ``grads`` is a subset).
        run_batch_size: the run's B, included among the batch sizes and used for the
            convergence of the mean.
        generator: seeds every draw.
        draws: random batches per batch size.

    Returns:
        An :class:`UnbiasednessCheck`.
    """
    n, n_params = grads.shape
    full_grad, gram = center_and_gram(grads)
    trace_sigma = gram.diagonal().sum().item() / n
    full_sq = full_grad.square().sum().item()
    full_norm = math.sqrt(full_sq)

    def predicted(b: int) -> float:
        return trace_sigma * noise_coefficient(b, n)

    def relative(err_sq: float) -> float:
        return math.sqrt(max(err_sq, 0.0)) / full_norm if full_norm > 0 else math.nan

    rows = []
    for b in batch_sizes_for_check(n, run_batch_size):
        selection = draw_batches(n, b, draws, generator)
        errors = sampling_errors(gram, selection)
        counts = selection.sum(0)  # (N,) times each example was drawn
        mean_err_sq = (counts @ gram @ counts).item() / (b * draws) ** 2
        rows.append(
            SamplingRow(
                batch_size=b,
                measured=errors.mean().item(),
                std_error=errors.std().item() / math.sqrt(draws),
                predicted=predicted(b),
                mean_rel_error=relative(mean_err_sq),
                chance_rel_error=relative(predicted(b) / draws),
            )
        )

    b = min(max(run_batch_size, 1), max(n // 2, 1))
    counts = torch.zeros(n, dtype=torch.float64)
    convergence, done = [], 0
    for k in CONVERGENCE_DRAWS:
        while done < k:
            chunk = min(_CHUNK, k - done)
            counts += draw_batches(n, b, chunk, generator).sum(0)
            done += chunk
        err_sq = (counts @ gram @ counts).item() / (b * k) ** 2
        convergence.append(ConvergenceRow(k, relative(err_sq), relative(predicted(b) / k)))

    return UnbiasednessCheck(
        n_examples=n,
        n_train=n_train,
        n_params=n_params,
        draws=draws,
        trace_sigma=trace_sigma,
        full_grad_sq_norm=full_sq,
        autograd_max_diff=(full_grad - autograd_mean).abs().max().item(),
        rows=rows,
        convergence_batch_size=b,
        convergence=convergence,
    )
