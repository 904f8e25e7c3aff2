"""Per-layer rules. Every rule module is imported here, in one visible place, to register it."""

from . import attention, conv, embedding, linear, norm, recurrent  # noqa: F401  (registration)
from ._registry import Call, Keep, Rule, flat_sq_norm, on_grad, register_rule, registered_rules, rule_for, widen
from .functional import FALLBACK, Batched, FunctionalRule

__all__ = [
    "Batched",
    "Call",
    "FALLBACK",
    "FunctionalRule",
    "Rule",
    "flat_sq_norm",
    "on_grad",
    "register_rule",
    "registered_rules",
    "rule_for",
    "widen",
]
