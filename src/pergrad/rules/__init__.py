"""Per-layer rules. Every rule module is imported here, in one visible place, to register it."""

from . import attention, conv, embedding, linear, norm, records, recurrent  # noqa: F401  (registration)
from ._registry import Call, Keep, Layout, Rule, on_grad, register_rule, registered_rules, rule_for, widen
from .functional import FALLBACK, Batched, FunctionalRule
from .records import Dense, Outer, Record, Reduced, Rows

__all__ = [
    "Batched",
    "Call",
    "Dense",
    "FALLBACK",
    "FunctionalRule",
    "Keep",
    "Layout",
    "Outer",
    "Record",
    "Reduced",
    "Rows",
    "Rule",
    "records",
    "on_grad",
    "register_rule",
    "registered_rules",
    "rule_for",
    "widen",
]
