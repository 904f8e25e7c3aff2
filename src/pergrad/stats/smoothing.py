"""The smoothing factor β shared by the streaming statistics and the trainer's settings.

Batch b of t gets weight β^(t−b) in the statistics' bias-corrected averages: β = 1 weighs all
batches equally, smaller β forgets faster, and β = 0 would keep nothing (0⁰ is undefined).
"""

from __future__ import annotations

import math

__all__ = ["check_beta"]


def check_beta(beta: float, name: str = "beta") -> float:
    """Return ``beta`` if it is a valid smoothing factor, in (0, 1].

    Args:
        beta: the smoothing factor.
        name: how the message names the setting (the trainer's is ``noise_beta``).

    Raises:
        ValueError: ``beta`` is not a number in (0, 1], naming the range and what it means.
    """
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or math.isnan(beta) or not 0.0 < beta <= 1.0:
        raise ValueError(
            f"{name} must be in (0, 1] (the weight of each older batch; 1 averages all batches equally), got {beta}"
        )
    return beta
