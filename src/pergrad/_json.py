"""JSON for the files pergrad writes: plain numbers, and infinities that survive the round trip."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["jsonable", "INF"]

INF = "inf"  # how +∞ is written ("-inf" for −∞); JSON has no infinity


def jsonable(value):
    """``value`` as plain JSON: numpy scalars as numbers, ±inf as the strings "inf"/"-inf",
    NaN as null; dicts (keys as strings), lists and tuples recursively."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return INF if value > 0 else "-" + INF
    return value
