"""Checks of the mini-batch assumptions: the averaging identity (additivity and sampling to come)."""

from .identity import IdentityReport, check_identity

__all__ = ["IdentityReport", "check_identity"]
