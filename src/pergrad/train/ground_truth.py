"""The noise scales of the synthetic linear regression in closed form, at any parameters.

With inputs x ~ N(0, H), H = diag(h), targets y = xᵀw* + ε, ε ~ N(0, σ²), and the loss
ℓ = ½(wᵀx + b − y)² of the model (w, b), write r = w − w* and q = rᵀHr + b² + σ² (twice the
expected loss). Isserlis' theorem gives the gradient's mean G, its per-example covariance Σ and
the Hessian H₊ of the parameters (w, b):

    G = (Hr, b),   H₊ = diag(H, 1),
    Σ = [[q H + H r rᵀH,  b H r], [b rᵀH,  q − b²]],

so that
    tr Σ     = q tr H + rᵀH²r + q − b²,        |G|²    = rᵀH²r + b²,
    tr(H₊Σ)  = q tr H² + rᵀH³r + q − b²,       GᵀH₊G  = rᵀH³r + b².

B_simple = tr Σ / |G|² and B_noise = tr(H₊Σ) / (GᵀH₊G), the batch size at which a step of
optimal size makes half the progress of a noiseless one under the quadratic model, which
predicts the critical batch size (McCandlish et al. 2018, eq. 2.8 and Appendix B).

References:
    McCandlish et al. 2018, "An Empirical Model of Large-Batch Training", arXiv:1812.06162.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .config import TrainConfig
from .data import LINREG_NOISE, linreg_problem

__all__ = ["linreg_noise_scales"]


def linreg_noise_scales(config: TrainConfig, weight: Tensor, bias: Tensor) -> tuple[float, float]:
    """(B_noise, B_simple) of the ``linreg`` dataset of ``config.dataset_seed`` at parameters (w, b).

    Args:
        config: its ``dataset_seed`` fixes w* (as :func:`pergrad.train.data.load_dataset` draws it).
        weight: (d,) w.
        bias: () b.

    Returns:
        (B_noise, B_simple) of the population (not of the finite training sample), in float64;
        inf where the gradient is zero.
    """
    h, w_star = linreg_problem(torch.Generator().manual_seed(config.dataset_seed))
    h, r = h.double(), weight.double() - w_star.double()
    b = float(bias)
    hr2 = float((h * r) @ (h * r))  # rᵀH²r
    hr3 = float((h * r) @ (h * h * r))  # rᵀH³r
    q = float(r @ (h * r)) + b * b + LINREG_NOISE**2
    trace_sigma = q * float(h.sum()) + hr2 + q - b * b
    trace_h_sigma = q * float((h * h).sum()) + hr3 + q - b * b
    g_sq, g_h_g = hr2 + b * b, hr3 + b * b
    return (trace_h_sigma / g_h_g if g_h_g > 0 else float("inf")), (trace_sigma / g_sq if g_sq > 0 else float("inf"))
