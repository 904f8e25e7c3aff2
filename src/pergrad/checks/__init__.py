"""Checks of the mini-batch assumptions: the averaging identity, additivity, random sampling."""

from .additivity import AdditivityReport, check_additivity
from .identity import IdentityReport, check_identity
from .sampling import SamplingReport, check_sampling

__all__ = [
    "AdditivityReport",
    "IdentityReport",
    "SamplingReport",
    "check_additivity",
    "check_identity",
    "check_sampling",
]
