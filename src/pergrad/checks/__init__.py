"""Checks of the mini-batch assumptions: the averaging identity, additivity, random sampling."""

from .additivity import AdditivityReport, check_additivity
from .identity import IdentityReport, check_identity
from .sampling import AlignmentReport, GradientAlignment, SamplingReport, check_sampling, consecutive_alignment_test

__all__ = [
    "AdditivityReport",
    "AlignmentReport",
    "GradientAlignment",
    "IdentityReport",
    "SamplingReport",
    "check_additivity",
    "check_identity",
    "check_sampling",
    "consecutive_alignment_test",
]
