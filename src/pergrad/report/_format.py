"""Numbers as the report prints them: the same text in the HTML and in the advice."""

from __future__ import annotations

import math

__all__ = ["number"]


def number(x: float | None, digits: int = 4) -> str:
    """``digits`` significant digits; "∞" for infinity; "–" for a missing value (None, NaN).

    Large and tiny magnitudes switch to scientific notation, e.g. ``1.234e+05``.
    """
    if x is None or math.isnan(x):
        return "–"
    if math.isinf(x):
        return "∞" if x > 0 else "−∞"
    if x != 0 and not 1e-3 <= abs(x) < 10**digits:
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}g}"
