"""pergrad: per-example gradients in one backward pass, and what mini-batch SGD averages.

Public API:
    PerExample, PerExampleResult: the engine.
    register_rule, Rule: add a per-example rule for your own layer.
    NoiseScale, ParamSNR, stats: gradient noise scale, SNR and the other estimators.
    AdaptiveBatchSize: a batch size that follows the noise scale, for your own loop.
    DistributedPerExample, StepResult, distributed: data-parallel workers and gradient
        accumulation, merged to the global batch.
    errors: UnsupportedModuleError, ExampleCouplingError, CaptureError.
"""

from . import distributed, stats
from .checks import AdditivityReport, IdentityReport, SamplingReport, check_additivity, check_identity, check_sampling
from .distributed import DistributedPerExample, StepResult
from .errors import CaptureError, ExampleCouplingError, PergradError, UnsupportedModuleError, VerificationError
from .per_example import PerExample, PerExampleResult
from .rules import Rule, register_rule, registered_rules
from .stats import AdaptiveBatchSize, NoiseScale, ParamSNR, StatsWarning

__version__ = "0.1.0"

__all__ = [
    "AdaptiveBatchSize",
    "AdditivityReport",
    "CaptureError",
    "DistributedPerExample",
    "ExampleCouplingError",
    "IdentityReport",
    "NoiseScale",
    "ParamSNR",
    "StatsWarning",
    "check_additivity",
    "check_identity",
    "check_sampling",
    "distributed",
    "PerExample",
    "PerExampleResult",
    "PergradError",
    "SamplingReport",
    "StepResult",
    "Rule",
    "UnsupportedModuleError",
    "VerificationError",
    "register_rule",
    "registered_rules",
    "stats",
]
