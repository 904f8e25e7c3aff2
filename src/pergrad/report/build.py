"""``build_report``: read a run directory, measure what the report shows, write it.

The order is: read every file (any problem stops here, before anything is written), rebuild
the data and the model at the checkpoint, compute the per-example quantities at θ in float64,
draw and render everything in memory, then write ``report_data.json`` and ``report.html``,
each atomically.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from .._atomic import write_atomic
from .._json import jsonable
from ..checks import check_sampling
from ..stats.alignment import AlignmentReport, GradientAlignment
from ..stats.smoothing import describe_smoothing
from ..train.metrics import Column
from ..train.suite import first_epoch
from . import figures, sections
from .advice import advise_batch_size
from .cbs import cbs_section, load_cbs
from .framework import framework_report, framework_settings
from .html import page
from .run_files import ReportError, load_data_and_model, load_run
from .theta import examples_at_theta, float64_copy, per_example_gradients
from .unbiasedness import check_unbiasedness, examples_for_check

__all__ = ["build_report", "REPORT", "DATA"]

REPORT = "report.html"
DATA = "report_data.json"


def build_report(run_dir: str | Path) -> Path:
    """(Re)build ``RUN_DIR/report.html`` and ``RUN_DIR/report_data.json`` from the run's files.

    Args:
        run_dir: a directory written by ``pergrad train`` (config.toml, metrics.csv,
            checkpoint.pt), or by a callback of :mod:`pergrad.integrations` (config.toml with
            its ``framework``, metrics.csv): its report has the sections its metrics carry.

    Returns:
        The path of ``report.html``.

    Raises:
        ReportError: the directory or a file in it is missing or unreadable, or the report
            cannot be written; nothing has been written then.
    """
    settings = framework_settings(Path(run_dir))
    if settings is not None:  # written by a callback of pergrad.integrations
        html, data = framework_report(Path(run_dir), settings)
        return _write(Path(run_dir), html, data)
    run = load_run(run_dir)
    cbs = load_cbs(run.path)
    dataset, model = load_data_and_model(run)
    config, metrics = run.config, run.metrics
    batch_size = int(metrics.last(Column.BATCH_SIZE)[0] or config.first_batch_size)
    batch_sizes = [tuple(change) for change in run.checkpoint.get("batch_sizes", [(0, config.first_batch_size)])]
    generator = torch.Generator().manual_seed(config.seed)

    predictor, columns, why = predictor_for(config.optimizer, metrics)
    noise, low, high = (metrics.column(c) for c in columns)
    advice = advise_batch_size(
        metrics.column(Column.STEP),
        noise,
        low,
        high,
        batch_size,
        b_crit=_measured_b_crit(cbs),
        predictor=predictor,
        why=why,
    )
    batches = first_epoch(config, dataset, batch_sizes)  # the run's own batches
    sampling = check_sampling(batches, dataset.labels)
    alignment = _alignment(run.checkpoint)
    model64 = float64_copy(model)
    x, y = dataset.train_x, dataset.train_y
    examples = examples_at_theta(model64, x, y, dataset.task)
    n_params = sum(p.numel() for p in model64.parameters() if p.requires_grad)
    subset = examples_for_check(x.shape[0], n_params, generator)
    grads, autograd_mean = per_example_gradients(model64, x[subset], y[subset], dataset.task)
    check = check_unbiasedness(grads, autograd_mean, x.shape[0], batch_size, generator)
    del grads

    with figures.style():
        parts = [
            sections.summary_section(run, x.shape[0], dataset.val_x.shape[0], advice),
            sections.assumptions_section(sampling, config.order, _label_mix(dataset, batches), alignment, metrics),
            sections.curves_section(metrics),
            sections.noise_scale_section(
                metrics, advice, config, batch_sizes, describe_smoothing(config.noise_beta, config.measure_every)
            ),
            cbs_section("cbs", dict(sections.SECTIONS)["cbs"], cbs, metrics),
            sections.snr_section(metrics, batch_size),
            sections.norms_section(examples, metrics),
            sections.outliers_section(examples, x, y, dataset.image_shape, dataset.task),
            sections.unbiasedness_section(check, batch_size),
        ]
    data = {"pergrad_version": __version__}
    for (section_id, _), (_, numbers) in zip(sections.SECTIONS, parts, strict=True):
        data[section_id] = numbers
    data["unbiasedness"]["subset"] = subset.tolist() if check.subsampled else None

    html = page(
        title="pergrad run report",
        subtitle=f"{run.path.resolve()} · {config.model} on {config.dataset} · step {run.checkpoint.get('step', '–')}",
        nav=list(sections.SECTIONS),
        sections=[body for body, _ in parts],
        footer=sections.footer(run.path, __version__),
    )
    return _write(run.path, html, data)


def _write(run_dir: Path, html: str, data: dict) -> Path:
    """Write ``report_data.json`` and ``report.html`` atomically; return the report's path."""
    try:
        write_atomic(run_dir / DATA, json.dumps(jsonable(data), indent=1, allow_nan=False) + "\n")
        write_atomic(run_dir / REPORT, html)
    except OSError as err:
        raise ReportError(
            f"cannot write the report into {run_dir} ({err.strerror}); make the directory writable"
        ) from None
    return run_dir / REPORT


def predictor_for(optimizer: str, metrics) -> tuple[str, tuple[str, str, str], str]:
    """The noise scale that predicts B_crit for this optimizer: its name, its three columns
    (value, low, high) and why, in one sentence ("" for SGD's B_simple)."""
    if optimizer == "adam" and metrics.has(Column.B_PRECOND):
        why = (
            "The advice reads B_P = tr(PΣ) / GᵀPG, not B_simple: Adam steps along −P ĝ with "
            "P = 1/(√v̂ + ε), so the noise and signal that matter are measured in P's metric "
            "(McCandlish et al. 2018, preconditioned optimizers). "
        )
        return "B_P", (Column.B_PRECOND, Column.B_PRECOND_LOW, Column.B_PRECOND_HIGH), why
    return "B_simple", (Column.B_SIMPLE, Column.B_SIMPLE_LOW, Column.B_SIMPLE_HIGH), ""


def _measured_b_crit(cbs: dict | None) -> tuple[float, float, float] | None:
    """(B_crit, low, high) from cbs.json, None where there is no fitted B_crit with an interval."""
    if cbs is None or cbs["b_crit"] is None or not cbs["b_crit_interval"]:
        return None
    return (cbs["b_crit"], *cbs["b_crit_interval"])


def _alignment(checkpoint: dict) -> AlignmentReport | None:
    """The consecutive-gradient alignment test over the steps the trainer kept, if any."""
    state = checkpoint.get("alignment")
    if state is None or state["units"] is None or state["units"].shape[0] < 4:
        return None
    alignment = GradientAlignment()
    alignment.load_state_dict(state)
    return alignment.result()


def _label_mix(dataset, batches: list[torch.Tensor]) -> np.ndarray | None:
    """(batches, classes) share of each class in each of the batches; None without labels."""
    if dataset.labels is None:
        return None
    labels = dataset.labels
    classes = int(labels.max()) + 1
    counts = np.stack([np.bincount(labels[b].numpy(), minlength=classes) for b in batches])
    return counts / counts.sum(1, keepdims=True)
