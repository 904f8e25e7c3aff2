"""Exceptions with messages that say what is wrong and how to fix it."""

from __future__ import annotations

__all__ = ["PergradError", "UnsupportedModuleError", "ExampleCouplingError", "CaptureError", "VerificationError"]


class PergradError(Exception):
    """Base class of pergrad's own errors."""


class UnsupportedModuleError(PergradError, TypeError):
    """A trainable module has no per-example rule."""


class ExampleCouplingError(PergradError, ValueError):
    """A module mixes examples (BatchNorm in training mode...): per-example gradients are undefined."""


class CaptureError(PergradError, RuntimeError):
    """The captured forward does not match the backward asked for (no forward, wrong n)."""


class VerificationError(PergradError, RuntimeError):
    """A per-example result disagrees with autograd's gradient of that example's own loss."""
