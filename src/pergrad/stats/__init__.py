"""Statistics of the per-example gradients: what the batch average hides.

Every estimator is a small immutable state, a NamedTuple with ``init`` / ``update`` / ``merge``
and a read-out (``finalize``, ``quantile``). The states of float64 sums (:class:`NoiseState`,
:class:`SNRState`, :class:`NormHistogram`) merge data-parallel workers with one sum reduction;
:class:`LargestNorms` merges by gathering. :class:`NoiseScale` wraps a :class:`NoiseState` for a
training loop, and :class:`ParamSNR` a :class:`SNRState`.

- :mod:`.batch`: unbiased tr Σ̂ and |G|²̂ from one batch, per example or from two batch sizes,
  with an opt-in finite-population correction.
- :mod:`.noise_scale`: :class:`NoiseScale`, the smoothed B_simple = tr Σ / |G|² with a
  confidence interval, in total and per parameter.
- :mod:`.preconditioner`: :func:`adam_preconditioner`, Adam's diagonal P for the preconditioned
  noise scale B_P = tr(PΣ) / GᵀPG (``NoiseScale(preconditioner=...)``).
- :mod:`.snr`: :class:`ParamSNR`, the elementwise and per-layer gradient signal-to-noise
  ratio from second moments.
- :mod:`.batch_size`: the norm test of Byrd et al. 2012 and the AdaScale gain.
- :mod:`.adaptive_batch`: :class:`AdaptiveBatchSize`, a batch size kept inside B_simple's
  confidence interval, and the learning-rate scaling that goes with it.
- :mod:`.norms`: quantiles of a window of norms, and over a stream; the largest norms.
- :mod:`.tradeoff`: the steps–examples trade-off and the critical batch size B_crit.
- :mod:`.alignment`: :class:`GradientAlignment`, are consecutive batch gradients more aligned
  than other pairs (a permutation test over a stream of count-sketched gradients).

References:
    McCandlish et al. 2018, "An Empirical Model of Large-Batch Training", arXiv:1812.06162.
    Byrd, Chin, Nocedal and Wu 2012, "Sample size selection in optimization methods for machine
    learning", Math. Program. 134(1):127-155.
    Johnson, Agrawal, Gu and Guestrin 2020, "AdaScale SGD", ICML, arXiv:2007.05105.
"""

from .adaptive_batch import AdaptiveBatchSize, lr_scaling_for
from .alignment import AlignmentReport, GradientAlignment, consecutive_alignment_test
from .batch import (
    BatchEstimate,
    StatsWarning,
    batch_estimate,
    mean_grad_sq_norm,
    noise_coefficient,
    param_batch_estimates,
    per_example_estimate,
    two_batch_estimate,
    weighted_sq_norms,
)
from .batch_size import NormTest, adascale_gain, norm_test
from .noise_scale import NoiseEstimate, NoiseScale, NoiseState, b_simple_ratio
from .norms import LargestNorms, NormHistogram, norm_quantiles
from .preconditioner import adam_preconditioner
from .smoothing import check_beta
from .snr import ParamSNR, SNREstimate, SNRState
from .tradeoff import TradeoffFit, fit_tradeoff

__all__ = [
    "AdaptiveBatchSize",
    "AlignmentReport",
    "BatchEstimate",
    "GradientAlignment",
    "LargestNorms",
    "NoiseEstimate",
    "NoiseScale",
    "NoiseState",
    "NormHistogram",
    "NormTest",
    "ParamSNR",
    "SNREstimate",
    "SNRState",
    "StatsWarning",
    "TradeoffFit",
    "adam_preconditioner",
    "adascale_gain",
    "b_simple_ratio",
    "batch_estimate",
    "check_beta",
    "consecutive_alignment_test",
    "fit_tradeoff",
    "lr_scaling_for",
    "mean_grad_sq_norm",
    "noise_coefficient",
    "norm_quantiles",
    "norm_test",
    "param_batch_estimates",
    "per_example_estimate",
    "two_batch_estimate",
    "weighted_sq_norms",
]
