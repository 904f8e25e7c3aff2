"""Checks of the mini-batch assumptions: the averaging identity and additivity (sampling to come)."""

from .additivity import AdditivityReport, check_additivity
from .identity import IdentityReport, check_identity

__all__ = ["AdditivityReport", "IdentityReport", "check_additivity", "check_identity"]
