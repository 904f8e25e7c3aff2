"""The checks of :mod:`pergrad.checks` on one training setup: the rows of ``pergrad check``, the
trainer's sampling warning and the report's sampling section.

The setup is a :class:`~pergrad.train.config.TrainConfig`: its dataset, model (at its initial
weights), loss and batch order are the ones ``pergrad train`` would use. The identity and
additivity checks run on a probe batch of the first training examples (float64); the sampling
check runs on the run's first epoch of batch indices against the dataset's labels.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..checks import IdentityReport, SamplingReport, check_additivity, check_identity, check_sampling
from .config import TrainConfig
from .data import Dataset, load_dataset
from .losses import per_example_losses
from .models import build_model
from .sampler import BatchOrder, sizes_by_step

__all__ = ["CheckRow", "first_epoch", "run_checks", "sampling_report", "sampling_warning", "PROBE_EXAMPLES"]

PROBE_EXAMPLES = 8  # examples in the identity and additivity probe batch


@dataclass(frozen=True)
class CheckRow:
    """One line of the table: which check, whether it passed, its key number, what it means."""

    check: str
    passed: bool
    result: str
    meaning: str


def first_epoch(
    config: TrainConfig, dataset: Dataset, batch_sizes: list[tuple[int, int]] | None = None
) -> list[Tensor]:
    """The run's batches of indices in epoch 0.

    Args:
        batch_sizes: the (first step, B) of each batch size the run used (its checkpoint's
            ``batch_sizes``); by default the config's first batch size throughout.
    """
    sizes = None if batch_sizes is None else sizes_by_step(batch_sizes)
    return BatchOrder.for_run(config, dataset).batches(0, sizes)


def sampling_report(
    config: TrainConfig, dataset: Dataset, batch_sizes: list[tuple[int, int]] | None = None
) -> SamplingReport:
    """The sampling check on the run's first epoch of batches (see :func:`first_epoch`)."""
    return check_sampling(first_epoch(config, dataset, batch_sizes), dataset.labels)


def sampling_warning(config: TrainConfig, dataset: Dataset) -> str | None:
    """A warning for the start of training when the run's batch order is not random, else None."""
    report = sampling_report(config, dataset)
    if report.passed:
        return None
    failed = f"batch order '{config.order}' fails the sampling check (p = {report.p_value:.2g})"
    return f"warning: {failed}. {report.explanation}"


def run_checks(config: TrainConfig) -> list[CheckRow]:
    """The identity, additivity and sampling checks on the setup ``config`` describes."""
    dataset = load_dataset(config)
    model = build_model(config, dataset)
    x, y = dataset.train_x[:PROBE_EXAMPLES], dataset.train_y[:PROBE_EXAMPLES]

    def loss_fn(outputs, targets):
        return per_example_losses(dataset.task, outputs, targets)

    identity = check_identity(model, x, y, loss_fn)
    additivity = check_additivity(model, x, y, loss_fn)
    sampling = sampling_report(config, dataset)
    return [
        CheckRow(
            "averaging identity",
            identity.passed,
            _identity_result(identity),
            identity.explanation,
        ),
        CheckRow(
            "additivity (no coupling)",
            additivity.passed,
            f"max leak {additivity.max_leak:.1g}"
            + (f" in {', '.join(additivity.culprits)}" if additivity.culprits else ""),
            additivity.explanation,
        ),
        CheckRow(
            f"random sampling ({config.order})",
            sampling.passed,
            f"p = {sampling.p_value:.2g}",
            sampling.explanation,
        ),
    ]


def _identity_result(report: IdentityReport) -> str:
    """The key numbers: the batch gradient and pergrad's, each against independent gradients."""
    text = f"max rel. diff {report.max_rel_diff:.1e}"
    if report.pergrad_max_rel_diff is not None:
        text += f", pergrad {report.pergrad_max_rel_diff:.1e}"
    return text
