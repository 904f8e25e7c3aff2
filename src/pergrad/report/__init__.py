"""The run report: a self-contained ``report.html`` (and ``report_data.json``) built from a
run directory that ``pergrad train`` wrote.

Sections: summary, loss and accuracy curves, the noise scale B_simple against the batch size
(with advice), the critical batch size where ``pergrad cbs`` measured it, per-parameter SNR,
per-example gradient norms at the saved parameters θ, the examples with the largest gradients,
and a check on the run's own data that a random mini-batch gradient is an unbiased estimate of
the full-data gradient.

Public API:
    build_report(run_dir) -> Path: (re)build the report.
    ReportError: a run directory the report cannot be built from.
"""

from .build import build_report
from .run_files import ReportError

__all__ = ["ReportError", "build_report"]
